"""Faults of train_stream.py kept apart from tests/test_train.py (another change edits that file):
an error in the main process ends the run and its loader workers; a full disk under a checkpoint or
the logs is one line."""

import errno
import io
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
from pipeline import checkpoint, train_logs
from tests.conftest import write_mel_shards
from tests.test_train import ROOT, child_env, one_thread_and_fresh_accelerate, run_args  # noqa: F401 (a fixture)

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


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


class FullDisk(io.BytesIO):
    def write(self, data):
        raise NO_SPACE


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_one_before(tmp_path, caplog, capsys,
                                                                                   monkeypatch):
    """torch's writer fails on the optimizer state of checkpoint-2: one line naming the folder and the
    reason, the partial checkpoint removed, checkpoint-1 whole, no traceback of any thread or atexit."""
    write_mel_shards(tmp_path / "train", [8])
    out = tmp_path / "o"
    real_open = open
    monkeypatch.setattr(checkpoint, "open", lambda path, *args, **kwargs: FullDisk()
                        if str(path).endswith(".tmp-checkpoint-2/optimizer.pt") else real_open(path, *args, **kwargs),
                        raising=False)
    caplog.clear()
    assert train_stream.main(run_args(out, str(tmp_path / "train"), "trainer_config.max_steps=3",
                                      "trainer_config.save_steps=1")) == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error == (f"{out}: cannot write checkpoint-2 (No space left on device): free some space and continue "
                     f"with trainer_config.resume_from_checkpoint=latest")
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["step"] == 1
    assert torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)["state"]
    assert "Traceback" not in caplog.text + capsys.readouterr().err


@pytest.mark.parametrize("target", ["metrics.jsonl", "tensorboard", "eval/step-1.json"])
def test_a_full_disk_under_the_metrics_is_one_line_and_ends_the_run(tmp_path, caplog, capsys, monkeypatch, target):
    """metrics.jsonl, the TensorBoard event file (flushed at each log line, in this thread) or an
    evaluation's captions cannot be written: one line naming it, exit 1, no writer thread's or atexit
    traceback."""
    from tensorboardX.event_file_writer import EventsWriter

    class FullText(io.StringIO):
        def flush(self):
            raise NO_SPACE

    def full(*args):
        raise NO_SPACE

    write_mel_shards(tmp_path / "train", [8])
    out = tmp_path / "o"
    if target == "metrics.jsonl":
        real_open = open
        monkeypatch.setattr(train_logs, "open", lambda path, *args, **kwargs: FullText()
                            if str(path).endswith("metrics.jsonl") else real_open(path, *args, **kwargs), raising=False)
    elif target == "tensorboard":
        monkeypatch.setattr(EventsWriter, "flush", full)
    else:
        real_write_json = train_stream.write_json
        monkeypatch.setattr(train_stream, "write_json", lambda path, data: full() if "/eval/" in str(path)
                            else real_write_json(path, data))
    caplog.clear()
    assert train_stream.main(run_args(out, str(tmp_path / "train"), "trainer_config.max_steps=3",
                                      "--val-shards", str(tmp_path / "train"), "trainer_config.eval_steps=1")) == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    what = "the evaluation's captions" if target.startswith("eval") else "the metrics"
    assert error == (f"{out / target}: cannot write {what} (No space left on device): free some space and "
                     f"continue with trainer_config.resume_from_checkpoint=latest")
    assert "Traceback" not in caplog.text + capsys.readouterr().err
