"""The torch side of the run folder (``pipeline.checkpoint``): reading a checkpoint back, file by file."""

import json
import types

import pytest
import safetensors.torch
import torch

from pipeline.checkpoint import checkpoint_part, load_checkpoint
from pipeline.train_logs import TrainingError


def test_each_rank_resumes_its_own_loader_state_and_a_new_rank_rank_0s(tmp_path):
    """The loader states of a 2-process checkpoint differ in their skip counts: rank 1 must read its own."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    safetensors.torch.save_model(model, str(tmp_path / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 2, "caption_tokens_longest": 5}))
    for rank in (0, 1):
        (tmp_path / f"loader_state_{rank}.json").write_text(json.dumps({"skipped": rank}))
    for rank, expected in ((0, 0), (1, 1), (2, 0)):
        read = []
        accelerator = types.SimpleNamespace(unwrap_model=lambda m, keep_torch_compile: m, scaler=None,
                                            process_index=rank, num_processes=3)
        loader = types.SimpleNamespace(load_state_dict=read.append)
        state = load_checkpoint(tmp_path, model, optimizer, loader, accelerator)
        assert (state.step, state.world_size, state.caption_tokens) == (3, 2, 5)
        assert read == [{"skipped": expected}], rank


def test_a_damaged_checkpoint_file_is_named(tmp_path):
    good = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": []}, good)
    assert checkpoint_part(good, lambda f: torch.load(f, weights_only=True))["state"] == {}
    good.write_bytes(good.read_bytes()[:40])  # cut short, as a full disk leaves it
    with pytest.raises(TrainingError, match=f"checkpoint file {good} cannot be loaded"):
        checkpoint_part(good, lambda f: torch.load(f, weights_only=True))
    state = tmp_path / "trainer_state.json"
    state.write_text('{"step": 3,')
    with pytest.raises(TrainingError, match="trainer_state.json cannot be loaded .JSONDecodeError"):
        checkpoint_part(state, lambda f: json.loads(f.read_text()))


def test_a_recorded_caption_length_that_is_not_a_count_stops_the_resume(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    safetensors.torch.save_model(model, str(tmp_path / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    (tmp_path / "loader_state_0.json").write_text("{}")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 1,
                                                             "caption_tokens_longest": "many"}))
    accelerator = types.SimpleNamespace(unwrap_model=lambda m, keep_torch_compile: m, scaler=None, process_index=0,
                                        num_processes=1)
    loader = types.SimpleNamespace(load_state_dict=lambda state: None)
    with pytest.raises(TrainingError, match="trainer_state.json: caption_tokens_longest='many': must be an integer"):
        load_checkpoint(tmp_path, model, optimizer, loader, accelerator)
