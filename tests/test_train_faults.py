"""Faults of train_stream.py kept apart from tests/test_train.py (another change edits that file):
a damaged checkpoint file is named with its problem, not a traceback."""

import json

import pytest
import torch

import train_stream


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
