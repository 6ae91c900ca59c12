"""Faults of train_stream.py kept apart from tests/test_train.py (another change edits that file):
a damaged checkpoint file is named with its problem, not a traceback; an error in the main process
ends the run and its loader workers."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_stream
from tests.conftest import write_mel_shards
from tests.test_train import ROOT, child_env, run_args


def test_a_damaged_checkpoint_file_is_named(tmp_path):
    good = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": []}, good)
    assert train_stream.checkpoint_part(good, lambda f: torch.load(f, weights_only=True))["state"] == {}
    good.write_bytes(good.read_bytes()[:40])  # cut short, as a full disk leaves it
    with pytest.raises(train_stream.TrainingError, match=f"checkpoint file {good} cannot be loaded"):
        train_stream.checkpoint_part(good, lambda f: torch.load(f, weights_only=True))
    state = tmp_path / "trainer_state.json"
    state.write_text('{"step": 3,')
    with pytest.raises(train_stream.TrainingError, match="trainer_state.json cannot be loaded .JSONDecodeError"):
        train_stream.checkpoint_part(state, lambda f: json.loads(f.read_text()))


def tagged_processes(tag: str) -> list[int]:
    """Processes whose environment holds ``tag`` (a run's workers inherit it from their parent)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if tag.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_an_error_in_evaluation_ends_the_run_and_its_workers_within_seconds(tmp_path):
    """A bug raising in the main process (here in evaluation) with 2 loader workers: exit 1 with the
    traceback, within seconds, and no worker left (workers ignore SIGTERM, so a process that exits
    with its loader still alive would wait for them forever)."""
    write_mel_shards(tmp_path / "train", [24])  # 12 batches: the workers are still at it when the error comes
    tag = f"WCS_TEST_TAG={secrets.token_hex(4)}"
    out = tmp_path / "o"
    out.mkdir()
    env = {**child_env(), "WCS_TEST_EVAL_ERROR": "1", tag.split("=")[0]: tag.split("=")[1]}
    argv = run_args(out, str(tmp_path / "train"), "--val-shards", str(tmp_path / "train"), "trainer_config.max_steps=4",
                    "trainer_config.eval_steps=1", "++trainer_config.dataloader_num_workers=2")
    try:
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "_train_ranks.py"), str(out), *argv], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        ended = time.time()
        assert done.returncode == 1, done.stderr[-3000:]
        assert "ERROR the run failed" in done.stderr and "RuntimeError: an error in evaluation" in done.stderr
        assert ended - float((out / "eval-error-at").read_text()) < 10
        deadline = time.time() + 5
        while tagged_processes(tag) and time.time() < deadline:
            time.sleep(0.1)
        assert not tagged_processes(tag)
    finally:  # a failing run must not leave its workers behind for the rest of the suite
        for pid in tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
