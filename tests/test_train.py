"""Training: the loss against the HF model's own, exact resume, checkpoint rotation, the final model,
a two-process run, SIGTERM, NaN steps and the offline error. Runs are in-process (``train_stream.main``)
where they can be, to keep the budget; multi-process and signal runs are real subprocesses."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import WhisperForConditionalGeneration, WhisperProcessor

import train_stream
from pipeline.config import load_config
from pipeline.model import load_model
from pipeline.stream import make_loader
from tests.conftest import write_mel_shards

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_fresh_accelerate():
    """One torch thread (on 2 shared cores, 2 OpenMP threads under load run several times slower);
    afterwards, forget the accelerate state the in-process runs set up, for other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_mel_shards(root / "train", [12, 12], captions_per_clip=2)
    write_mel_shards(root / "val", [5], prefix="v")
    return str(root / "train"), str(root / "val")


def run_args(out, train, *extra):
    """A small, fast run of the tiny model; ``extra`` overrides come last and win."""
    return ["--shards", train, f"trainer_config.output_dir={out}", "trainer_config.per_device_train_batch_size=2",
            "trainer_config.logging_steps=1", "trainer_config.warmup_steps=2", "++trainer_config.learning_rate=2e-3",
            "++trainer_config.dataloader_num_workers=0", "trainer_config.eval_steps=1000",
            "trainer_config.save_steps=1000", *extra]


def train_losses(out) -> dict[int, float]:
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if m["prefix"] == "train"}


class KeyRecorder:
    """Wraps the training loader: records the keys of every batch handed out; optionally raises
    SIGTERM in this process when handing out batch number ``signal_at`` (1-based)."""

    def __init__(self, loader, seen: list, signal_at: int | None = None):
        self.loader, self.seen, self.signal_at = loader, seen, signal_at

    def __iter__(self):
        for batch in self.loader:
            self.seen.append(batch["keys"])
            if len(self.seen) == self.signal_at:
                signal.raise_signal(signal.SIGTERM)
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def record_keys(monkeypatch, seen: list, signal_at: int | None = None) -> None:
    def recording_make_loader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        return KeyRecorder(loader, seen, signal_at) if kwargs.get("train") else loader
    monkeypatch.setattr(train_stream, "make_loader", recording_make_loader)


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- loss

def test_loss_equals_the_hf_models_own_loss(shards, tiny_processor):
    model = load_model("tiny", tiny_processor)
    # 5 clips over 2 ranks, 3 slots each: one rank's batch holds 2 real clips and a padding sample
    batch = next(b for rank in (0, 1) for b in make_loader(shards[1], tiny_processor.tokenizer, batch_size=3,
                                                           train=False, rank=rank, world_size=2) if b["is_pad"].any())
    assert batch["is_pad"].tolist() == [False, False, True]
    ours, tokens = train_stream.compute_loss(model, batch, "cpu")
    hf = model(input_features=batch["input_features"].float(), labels=batch["labels"]).loss
    assert torch.allclose(ours, hf, rtol=1e-6, atol=1e-6) and tokens == (batch["labels"] != -100).sum()

    # a row marked as padding contributes nothing, whatever its labels hold
    marked = dict(batch, is_pad=torch.tensor([False, True, True]))
    only_first = batch["labels"].clone()
    only_first[1:] = -100
    hf_first = model(input_features=batch["input_features"].float(), labels=only_first).loss
    assert torch.allclose(train_stream.compute_loss(model, marked, "cpu")[0], hf_first, rtol=1e-6, atol=1e-6)

    # all padding: loss 0, yet every trainable parameter gets a (zero) gradient, as DDP needs
    empty = dict(batch, is_pad=torch.ones(3, dtype=torch.bool), labels=torch.full_like(batch["labels"], -100))
    model.zero_grad(set_to_none=True)
    loss, tokens = train_stream.compute_loss(model, empty, "cpu")
    loss.backward()
    assert loss.item() == 0.0 and tokens.item() == 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)


def test_lr_schedule_warms_up_then_decays():
    tc = load_config(overrides=["trainer_config.warmup_steps=4", "++trainer_config.learning_rate=1.0"]).trainer_config
    assert [train_stream.lr_at(s, tc, 14) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert train_stream.lr_at(4, tc, 14) == 1.0 and train_stream.lr_at(9, tc, 14) == 0.5
    assert train_stream.lr_at(14, tc, 14) == 0.0
    tc.lr_scheduler_type = "cosine"
    assert math.isclose(train_stream.lr_at(9, tc, 14), 0.5) and train_stream.lr_at(14, tc, 14) == 0.0
    tc.lr_scheduler_type = "constant"
    assert train_stream.lr_at(13, tc, 14) == 1.0


def test_model_options_apply(tiny_processor, shards):
    cfg = load_config(overrides=["model_config.dropout=0.25", "model_config.freeze_encoder=true",
                                 "model_config.gradient_checkpointing=true", "++model_config.mask_time_prob=0.3",
                                 "model_config.apply_spec_augment=true"])
    model = load_model("tiny", tiny_processor)
    train_stream.apply_model_options(model, cfg.model_config)
    assert model.model.encoder.layers[0].dropout == 0.25 and model.model.decoder.dropout == 0.25
    assert model.config.apply_spec_augment and model.config.mask_time_prob == 0.3
    assert model.is_activation_checkpointing
    groups = train_stream.param_groups(model, 0.01)
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert not any(p is q for p in model.model.encoder.parameters() for g in groups for q in g["params"])
    batch = next(iter(make_loader(shards[1], tiny_processor.tokenizer, batch_size=2, train=False)))
    model.train()
    train_stream.compute_loss(model, batch, "cpu")[0].backward()
    assert model.model.encoder.conv1.weight.grad is None and model.model.decoder.layers[0].fc1.weight.grad is not None


# ---------------------------------------------------------------------------- resume and checkpoints

def test_resume_is_exact_checkpoints_rotate_final_model_loads(tmp_path, shards, monkeypatch):
    common = ["trainer_config.max_steps=6", "trainer_config.gradient_accumulation_steps=2",
              "model_config.dropout=0.1", "++trainer_config.dataloader_num_workers=2"]
    straight, seen_straight = tmp_path / "straight", []
    record_keys(monkeypatch, seen_straight)
    assert train_stream.main(run_args(straight, shards[0], *common, "trainer_config.save_steps=1",
                                      "++trainer_config.save_total_limit=2")) == 0

    # the same run, stopped by SIGTERM during step 3 (its 5th micro-batch), then resumed
    parts, seen_first, seen_second = tmp_path / "parts", [], []
    record_keys(monkeypatch, seen_first, signal_at=5)
    assert train_stream.main(run_args(parts, shards[0], *common)) == 0
    assert sorted(p.name for p in parts.glob("checkpoint-*")) == ["checkpoint-3"] and not (parts / "final").exists()
    record_keys(monkeypatch, seen_second)
    assert train_stream.main(run_args(parts, shards[0], *common,
                                      "trainer_config.resume_from_checkpoint=latest")) == 0

    assert seen_first + seen_second == seen_straight and len(seen_straight) == 12
    losses, resumed = train_losses(straight), train_losses(parts)
    assert sorted(losses) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert abs(losses[step] - resumed[step]) <= 1e-6, (step, losses[step], resumed[step])
    assert losses[6] < losses[1]

    # rotation: save_steps=1 with save_total_limit=2 leaves the newest two
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    assert not list(straight.glob(".tmp-*"))
    ckpt = straight / "checkpoint-6"
    assert {"model.safetensors", "optimizer.pt", "rng_state_0.pt", "loader_state_0.json", "trainer_state.json",
            "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "loader_state_0.json").read_text())["batches"] == 12
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert saved["trainer_config"]["output_dir"] == str(straight) and saved["model_config"]["dropout"] == 0.1
    assert yaml.safe_load((straight / "config.yaml").read_text()) == saved

    # the final model loads with plain transformers and equals the resumed run's
    model = WhisperForConditionalGeneration.from_pretrained(straight / "final")
    processor = WhisperProcessor.from_pretrained(straight / "final")
    assert processor.tokenizer("a dog").input_ids[:4] == [50258, 50259, 50358, 50363]
    assert model.generation_config.language == "en" and model.generation_config.task == "translate"
    other = WhisperForConditionalGeneration.from_pretrained(parts / "final").state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, other[name], atol=1e-6), name


def test_nan_loss_steps_are_skipped_then_stop_the_run(tmp_path, shards, monkeypatch, caplog):
    real, calls = train_stream.compute_loss, []

    def nan_on(bad):
        def compute_loss(model, batch, device):
            calls.append(1)
            loss, tokens = real(model, batch, device)
            return (loss * float("nan") if bad(len(calls)) else loss), tokens
        return compute_loss

    monkeypatch.setattr(train_stream, "compute_loss", nan_on(lambda n: n == 2))
    assert train_stream.main(run_args(tmp_path / "one", shards[0], "trainer_config.max_steps=3")) == 0
    assert "non-finite loss at step 1" in caplog.text and len(calls) == 4  # 3 steps + the skipped one
    assert sorted(train_losses(tmp_path / "one")) == [1, 2, 3]
    final = WhisperForConditionalGeneration.from_pretrained(tmp_path / "one" / "final")
    assert all(torch.isfinite(p).all() for p in final.parameters())

    monkeypatch.setattr(train_stream, "compute_loss", nan_on(lambda n: True))
    assert train_stream.main(run_args(tmp_path / "all", shards[0], "trainer_config.max_steps=3",
                                      "++trainer_config.max_bad_steps=2")) == 1
    assert "2 steps in a row with a NaN/inf loss" in caplog.text


def test_offline_hub_id_and_bad_config_exit_2(tmp_path, shards, caplog, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = run_args(tmp_path / "o", shards[0], "model_config.name=openai/whisper-small-not-cached")
    assert train_stream.main(argv) == 2
    assert "model_config.name=tiny" in caplog.text and "Traceback" not in caplog.text
    assert train_stream.main(run_args(tmp_path / "o", shards[0], "trainer_config.max_stepz=1")) == 2
    assert "valid keys of 'trainer_config'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ processes

def test_two_process_run_gathers_validation_across_ranks(tmp_path, shards):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "train_stream.py"),
           *run_args(out, shards[0], "--val-shards", shards[1], "trainer_config.max_steps=3",
                     "trainer_config.per_device_train_batch_size=4", "++trainer_config.split_batches=true",
                     "trainer_config.eval_steps=3", "trainer_config.per_device_eval_batch_size=2",
                     "++trainer_config.eval_metrics=[bleu]", "++trainer_config.generation_max_new_tokens=4")]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["per_device_batch_size"] == 2 and info["effective_batch_size"] == 4
    assert "world size 2" in done.stderr
    rows = json.loads((out / "eval" / "step-3.json").read_text())  # both ranks' clips, padding left out
    assert sorted(r["key"] for r in rows) == [f"v000_{i:04d}" for i in range(5)]
    assert all(r["references"] == [f"caption {r['key']} 0"] for r in rows)
    ckpt = out / "checkpoint-3"
    states = [json.loads((ckpt / f"loader_state_{r}.json").read_text()) for r in (0, 1)]
    assert all(s["world_size"] == 2 and s["batches"] == 3 for s in states)
    assert (ckpt / "rng_state_1.pt").is_file() and (out / "final" / "model.safetensors").is_file()
    assert sorted(train_losses(out)) == [1, 2, 3]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, shards):
    out = tmp_path / "term"
    cmd = [sys.executable, str(ROOT / "train_stream.py"), *run_args(out, shards[0], "trainer_config.max_steps=100000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in err and "Traceback" not in err
    (ckpt,) = out.glob("checkpoint-*")
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert ckpt.name == f"checkpoint-{step}" and step >= 2 and max(train_losses(out)) == step
    assert not (out / "final").exists()
