"""Training: the loss against the HF model's own, exact resume, checkpoint rotation, the final model,
a two-process run, SIGTERM, NaN steps and the offline error. Runs are in-process (``train_stream.main``)
where they can be, to keep the budget; multi-process and signal runs are real subprocesses."""

import collections
import copy
import errno
import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import WhisperForConditionalGeneration, WhisperProcessor

import train_stream
from pipeline.collate import expand_features
from pipeline.config import ConfigError, load_config
from pipeline.collate import prompt_ids
from pipeline.model import LANGUAGE, TASK, generate_captions, load_model, load_processor, recorded_caption_tokens, recorded_prefixes
from pipeline import optim, train_logs
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
    reset_accelerate_state()


def reset_accelerate_state() -> None:
    """accelerate keeps one state per process, fixed by the first ``Accelerator``: in-process runs
    with another mixed precision need it forgotten."""
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
    """Wraps the training loader: records the keys (or the whole batch) of every batch handed out; optionally raises
    SIGTERM in this process when handing out batch number ``signal_at`` (1-based)."""

    def __init__(self, loader, seen: list, signal_at: int | None = None, keep_batches: bool = False):
        self.loader, self.seen, self.signal_at, self.keep_batches = loader, seen, signal_at, keep_batches

    def __iter__(self):
        for batch in self.loader:
            self.seen.append(dict(batch) if self.keep_batches else batch["keys"])
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


def tar_keys(directory: Path) -> list[str]:
    """Sample keys of every shard in ``directory``, read with plain tarfile."""
    names = [n for path in sorted(directory.glob("*.tar")) for n in tarfile.open(path).getnames()]
    return sorted({n.split(".", 1)[0] for n in names})


def initial_weights() -> dict[str, torch.Tensor]:
    """The tiny model as a run with the default seed starts it (``set_seed`` then ``build_model``)."""
    set_seed(load_config().trainer_config.seed)
    model = load_model("tiny")
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, script: Path, *argv, env: dict | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N`` on this CPU machine (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env={**child_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def launch_ranks(out: Path, train: str, *extra, env: dict | None = None) -> list[dict]:
    """A 2-process run through tests/_train_ranks.py: per rank, its world size, micro-batch keys and
    final parameters."""
    done = launch(2, ROOT / "tests" / "_train_ranks.py", out, *run_args(out, train, *extra), env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = []
    for rank in (0, 1):
        info = json.loads((out / f"rank-{rank}.json").read_text())
        info["weights"] = safetensors.torch.load_file(out / f"rank-{rank}.safetensors")
        info["stderr"] = done.stderr
        ranks.append(info)
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


def longest_caption(tokenizer, keys) -> int:
    """What ``max_new_tokens`` must allow for the longest caption of ``keys`` (the ``shards`` fixture's
    "caption KEY J"), as the tokenizer writes it: the ids after <|startoftranscript|> and the three
    task tokens, the end token included. Both captions of a key have the same length, so which one
    a visit drew does not matter."""
    task = len(tokenizer("").input_ids) - 1
    lengths = {key: {len(tokenizer(f"caption {key} {j}").input_ids) - task for j in range(2)} for key in keys if key}
    assert all(len(both) == 1 for both in lengths.values()), lengths
    return max(both.pop() for both in lengths.values())


def checkpoint_caption_tokens(checkpoint: Path) -> int | None:
    return json.loads((checkpoint / "trainer_state.json").read_text())["caption_tokens_longest"]


def final_caption_tokens(out: Path) -> int | None:
    return recorded_caption_tokens(WhisperForConditionalGeneration.from_pretrained(out / "final"))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(out / "final" / "model.safetensors")


# --------------------------------------------------------------------------------------------- loss

def test_loss_equals_the_hf_models_own_loss(shards, tiny_processor):
    model = load_model("tiny", tiny_processor)
    # 5 clips over 2 ranks, 3 slots each: one rank's batch holds 2 real clips and a padding sample
    batch = next(b for rank in (0, 1) for b in make_loader(shards[1], tiny_processor.tokenizer, batch_size=3,
                                                           train=False, rank=rank, world_size=2) if b["is_pad"].any())
    assert batch["is_pad"].tolist() == [False, False, True]
    ours, tokens = train_stream.compute_loss(model, batch, "cpu")
    hf = model(input_features=expand_features(batch).float(), labels=batch["labels"]).loss
    assert torch.allclose(ours, hf, rtol=1e-6, atol=1e-6) and tokens == (batch["labels"] != -100).sum()

    # a row marked as padding contributes nothing, whatever its labels hold
    marked = dict(batch, is_pad=torch.tensor([False, True, True]))
    only_first = batch["labels"].clone()
    only_first[1:] = -100
    hf_first = model(input_features=expand_features(batch).float(), labels=only_first).loss
    assert torch.allclose(train_stream.compute_loss(model, marked, "cpu")[0], hf_first, rtol=1e-6, atol=1e-6)

    # all padding: loss 0, yet every trainable parameter gets a (zero) gradient, as DDP needs
    empty = dict(batch, is_pad=torch.ones(3, dtype=torch.bool), labels=torch.full_like(batch["labels"], -100))
    model.zero_grad(set_to_none=True)
    loss, tokens = train_stream.compute_loss(model, empty, "cpu")
    loss.backward()
    assert loss.item() == 0.0 and tokens.item() == 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)


def test_accumulated_micro_batches_step_on_the_mean_of_their_gradients(tmp_path, shards, monkeypatch):
    """Two micro-batches accumulated = the mean of the two HF-loss gradients computed apart; the step
    is AdamW on that gradient clipped to max_grad_norm; the logged loss is the mean HF loss."""
    batches, before = [], {}
    real_make_loader, real_step = train_stream.make_loader, train_stream.optimizer_step

    def recording_make_loader(*args, **kwargs):
        loader = real_make_loader(*args, **kwargs)
        return KeyRecorder(loader, batches, keep_batches=True) if kwargs.get("train") else loader

    def recording_step(model, optimizer, accelerator, stats, lr, max_grad_norm):
        unwrapped = accelerator.unwrap_model(model)
        before["model"] = copy.deepcopy(unwrapped)
        before["grads"] = {n: p.grad.clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
        before["lr"] = float(lr)
        return real_step(model, optimizer, accelerator, stats, lr, max_grad_norm)

    monkeypatch.setattr(train_stream, "make_loader", recording_make_loader)
    monkeypatch.setattr(train_stream, "optimizer_step", recording_step)
    out = tmp_path / "accumulate"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=1",
                                      "trainer_config.gradient_accumulation_steps=2")) == 0
    assert len(batches) == 2 and batches[0]["keys"] != batches[1]["keys"]

    reference = before["model"]  # the weights the step started from
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    grads, losses = [], []
    for batch in batches:
        loss = reference(input_features=expand_features(batch).float(), labels=batch["labels"]).loss
        grads.append(torch.autograd.grad(loss, list(params.values()), allow_unused=True))
        losses.append(loss.item())
    for (name, param), g0, g1 in zip(params.items(), *grads):
        mean = (g0 if g0 is not None else torch.zeros_like(param)) / 2 + (g1 if g1 is not None else 0) / 2
        assert torch.allclose(before["grads"][name], mean, rtol=1e-4, atol=1e-8), name
    assert math.isclose(train_losses(out)[1], sum(losses) / 2, rel_tol=1e-5)

    # the step itself, with torch's own clipping and AdamW on the reference gradient
    tc = load_config(overrides=run_args(out, shards[0])[2:]).trainer_config
    for name, param in params.items():
        param.grad = before["grads"][name]
    torch.nn.utils.clip_grad_norm_(list(params.values()), tc.max_grad_norm)
    decay = [p for p in params.values() if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=before["lr"], betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon)
    optimizer.step()
    assert math.isclose(before["lr"], tc.learning_rate / (tc.warmup_steps + 1), rel_tol=1e-7)  # warmup's first step
    trained = final_weights(out)
    for name, param in params.items():
        assert torch.allclose(trained[name], param.detach(), atol=1e-7), name


def test_lr_schedule_warms_up_then_decays():
    tc = load_config(overrides=["trainer_config.warmup_steps=4", "++trainer_config.learning_rate=1.0"]).trainer_config
    assert [optim.lr_at(s, tc, 14) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert optim.lr_at(4, tc, 14) == 1.0 and optim.lr_at(9, tc, 14) == 0.5
    assert optim.lr_at(14, tc, 14) == 0.0
    tc.lr_scheduler_type = "cosine"
    assert math.isclose(optim.lr_at(9, tc, 14), 0.5) and optim.lr_at(14, tc, 14) == 0.0
    tc.lr_scheduler_type = "constant"
    assert optim.lr_at(13, tc, 14) == 1.0


def test_model_options_apply(tiny_processor, shards):
    cfg = load_config(overrides=["model_config.dropout=0.25", "model_config.freeze_encoder=true",
                                 "model_config.gradient_checkpointing=true", "++model_config.mask_time_prob=0.3",
                                 "model_config.apply_spec_augment=true"])
    model = load_model("tiny", tiny_processor)
    train_stream.apply_model_options(model, cfg.model_config)
    assert model.model.encoder.layers[0].dropout == 0.25 and model.model.decoder.dropout == 0.25
    assert model.config.apply_spec_augment and model.config.mask_time_prob == 0.3
    assert model.is_activation_checkpointing
    groups = optim.param_groups(model, 0.01)
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert not any(p is q for p in model.model.encoder.parameters() for g in groups for q in g["params"])
    batch = next(iter(make_loader(shards[1], tiny_processor.tokenizer, batch_size=2, train=False)))
    model.train()
    train_stream.compute_loss(model, batch, "cpu")[0].backward()
    assert model.model.encoder.conv1.weight.grad is None and model.model.decoder.layers[0].fc1.weight.grad is not None


def test_label_smoothing_prefix_and_beams_reach_the_loss_evaluation_and_final_model(tmp_path, shards, monkeypatch):
    """A run with a caption prefix, label smoothing and 2-beam evaluation: its first loss is torch's
    smoothed cross-entropy on the HF model's logits; its evaluation captions are HF ``generate``'s,
    prompted with the prefix (stripped); final/ records the prefix."""
    batches, prefix = [], "clotho > caption:"

    def recording_make_loader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        return KeyRecorder(loader, batches, keep_batches=True) if kwargs.get("train") else loader

    monkeypatch.setattr(train_stream, "make_loader", recording_make_loader)
    out = tmp_path / "o"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=1", "--val-shards", shards[1],
                                      f"data_config.caption_prefix='{prefix}'", "trainer_config.label_smoothing=0.2",
                                      "trainer_config.generation_num_beams=2", "++trainer_config.eval_metrics=[bleu]",
                                      "++trainer_config.generation_max_new_tokens=4")) == 0
    batch, tok = batches[0], load_processor("tiny").tokenizer
    given = len(prompt_ids(tok, prefix))
    assert (batch["labels"][:, 3:3 + given] == -100).all()
    assert batch["decoder_input_ids"][0, 4:4 + given].tolist() == prompt_ids(tok, prefix)
    set_seed(load_config().trainer_config.seed)
    logits = load_model("tiny")(input_features=expand_features(batch).float(),
                                decoder_input_ids=batch["decoder_input_ids"]).logits
    smoothed = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                                                 label_smoothing=0.2)
    assert math.isclose(train_losses(out)[1], smoothed.item(), rel_tol=1e-5)

    final = load_model(str(out / "final")).eval()
    assert recorded_prefixes(final) == [("default", prefix)]
    rows = {r["key"]: r["prediction"] for r in json.loads((out / "eval" / "step-1.json").read_text())}
    val = next(iter(make_loader(shards[1], tok, batch_size=5, train=False)))
    prompt = torch.tensor([tok.prefix_tokens + prompt_ids(tok, prefix)]).expand(5, -1)
    with torch.no_grad():
        ids = final.generate(input_features=expand_features(val).float(), decoder_input_ids=prompt, num_beams=2,
                             max_new_tokens=4, language=LANGUAGE, task=TASK, do_sample=False)
    assert rows == {k: t.strip() for k, t in zip(val["keys"], tok.batch_decode(ids, skip_special_tokens=True))}


def test_freeze_patterns_keep_weights_out_of_the_optimizer_and_unchanged(tmp_path, shards, tiny_processor):
    patterns = ["model.encoder.conv*", "model.encoder.layers.0.*"]
    cfg = load_config(overrides=[f"model_config.freeze={patterns}"])
    model = load_model("tiny", tiny_processor)
    fixed = {n for n, p in model.named_parameters() if not p.requires_grad}  # Whisper's sinusoidal positions
    train_stream.apply_model_options(model, cfg.model_config)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen - fixed == {n for n, _ in model.named_parameters() if n.startswith(("model.encoder.conv",
                                                                                     "model.encoder.layers.0."))}
    optimized = {id(p) for g in optim.param_groups(model, 0.01) for p in g["params"]}
    assert not any(id(p) in optimized for n, p in model.named_parameters() if n in frozen)

    out = tmp_path / "o"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=2", f"model_config.freeze={patterns}")) == 0
    before, after = initial_weights(), final_weights(out)
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert not torch.equal(after["model.encoder.layers.1.fc1.weight"], before["model.encoder.layers.1.fc1.weight"])
    info = json.loads((out / "run_info.json").read_text())
    assert info["trainable_parameters"] == info["parameters"] - sum(before[n].numel() for n in frozen)

    cfg = load_config(overrides=["model_config.freeze=[model.encoder.layer.*]"])
    with pytest.raises(ConfigError, match="'model.encoder.layer.\\*' matches no parameter name"):
        train_stream.apply_model_options(load_model("tiny", tiny_processor), cfg.model_config)


def test_lora_trains_adapters_only_and_final_is_a_plain_merged_whisper(tmp_path, shards):
    pytest.importorskip("peft")
    out = tmp_path / "o"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=2", "model_config.lora_r=4")) == 0
    before, after = initial_weights(), final_weights(out)
    assert set(after) <= set(before)  # the adapters are merged: no lora_* tensors, Whisper's own names
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    info = json.loads((out / "run_info.json").read_text())
    assert info["trainable_parameters"] == 2 * 4 * 4 * 64 * 3  # 6 attentions x (q, v) x (A + B) of rank 4, d 64
    assert isinstance(load_model(str(out / "final")), WhisperForConditionalGeneration)


def test_lora_with_validation_evaluates_the_adapted_model_as_hf_generate_does(tmp_path, shards):
    """Evaluation of a LoRA run: its loss and captions are the ``PeftModel``'s, adapters active, as
    torch's cross-entropy and HF ``generate`` on that same model (rebuilt from the step's checkpoint)
    give them."""
    pytest.importorskip("peft")
    out = tmp_path / "o"
    options = run_args(out, shards[0], "trainer_config.max_steps=2", "model_config.lora_r=4",
                       "trainer_config.eval_steps=2", "trainer_config.save_steps=2",
                       "++trainer_config.eval_metrics=[bleu]", "++trainer_config.generation_max_new_tokens=4")
    assert train_stream.main([*options, "--val-shards", shards[1]]) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (evaluated,) = [m for m in metrics if m["prefix"] == "eval" and m["step"] == 2]
    _, peft_model = train_stream.build_model(load_config(overrides=options[2:]))
    safetensors.torch.load_model(peft_model, str(out / "checkpoint-2" / "model.safetensors"))
    peft_model.eval()
    tok = load_processor("tiny").tokenizer
    val = next(iter(make_loader(shards[1], tok, batch_size=5, train=False)))
    with torch.no_grad():
        loss = train_stream.compute_loss(peft_model, val, "cpu")[0].item()
        with peft_model.disable_adapter():
            plain = train_stream.compute_loss(peft_model, val, "cpu")[0].item()
        ids = generate_captions(peft_model, expand_features(val).float(), max_new_tokens=4, method="hf")
    assert math.isclose(evaluated["loss"], loss, rel_tol=1e-5) and not math.isclose(loss, plain, rel_tol=1e-5)
    rows = {r["key"]: r["prediction"] for r in json.loads((out / "eval" / "step-2.json").read_text())}
    assert rows == {k: t.strip() for k, t in zip(val["keys"], tok.batch_decode(ids, skip_special_tokens=True))}


def test_lora_without_peft_is_one_clear_error(monkeypatch, tiny_processor):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    mc = load_config(overrides=["model_config.lora_r=4"]).model_config
    with pytest.raises(ConfigError, match=r"lora_r > 0 needs peft: pip install 'whisper-caption-stream\[lora\]'"):
        train_stream.add_lora(load_model("tiny", tiny_processor), mc)


# ---------------------------------------------------------------------------- resume and checkpoints

def test_resume_is_exact_checkpoints_rotate_final_model_loads(tmp_path, shards, monkeypatch, tiny_processor):
    common = ["trainer_config.max_steps=6", "trainer_config.gradient_accumulation_steps=2",
              "model_config.dropout=0.1", "++trainer_config.dataloader_num_workers=2"]
    straight, seen_straight = tmp_path / "straight", []
    record_keys(monkeypatch, seen_straight)
    assert train_stream.main(run_args(straight, shards[0], *common, "trainer_config.save_steps=1",
                                      "++trainer_config.save_total_limit=2", "++trainer_config.log_sample_keys=true")) == 0

    # the same run, stopped by SIGTERM during step 3 (its 5th micro-batch), then resumed; the stop
    # flag is read one step late (no host sync per step), so the run saves at the end of step 4
    parts, seen_first, seen_second = tmp_path / "parts", [], []
    record_keys(monkeypatch, seen_first, signal_at=5)
    assert train_stream.main(run_args(parts, shards[0], *common, "++trainer_config.log_sample_keys=true")) == 0
    assert sorted(p.name for p in parts.glob("checkpoint-*")) == ["checkpoint-4"] and not (parts / "final").exists()
    audit = parts / "sample_keys" / "rank-0.jsonl"
    with open(audit, "a") as f:  # what a run killed after step 5, before saving it, leaves behind
        f.write(json.dumps({"step": 5, "epoch": 0, "keys": ["lost"]}) + "\n" + '{"step": 6, "ep')
    record_keys(monkeypatch, seen_second)
    assert train_stream.main(run_args(parts, shards[0], *common, "++trainer_config.log_sample_keys=true",
                                      "trainer_config.resume_from_checkpoint=latest")) == 0

    assert seen_first + seen_second == seen_straight and len(seen_straight) == 12
    # the audit log: one line per step, the keys of its two micro-batches, the same over the two runs
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert lines == [json.loads(line) for line in (straight / "sample_keys" / "rank-0.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["keys"]) for r in lines] == [
        (step + 1, 0, seen_straight[2 * step] + seen_straight[2 * step + 1]) for step in range(6)]
    losses, resumed = train_losses(straight), train_losses(parts)
    assert sorted(losses) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert abs(losses[step] - resumed[step]) <= 1e-6, (step, losses[step], resumed[step])
    assert losses[6] < losses[1]

    # the longest caption trained on: in the checkpoint so far, and the same in both final models
    tok = tiny_processor.tokenizer
    trained_first = longest_caption(tok, [k for keys in seen_first for k in keys])
    assert checkpoint_caption_tokens(parts / "checkpoint-4") == trained_first
    assert final_caption_tokens(straight) == final_caption_tokens(parts) == longest_caption(
        tok, [k for keys in seen_straight for k in keys])

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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_in_half_precision_and_resumes_exactly(tmp_path, shards, monkeypatch, request,
                                                                       precision):
    """On the CPU too: autocast really runs the model in the half type, fp16 goes through a GradScaler
    whose state (scaler.pt) a resumed run continues; stopped and resumed equals straight through."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    dtypes, real_build = set(), train_stream.build_model

    def build_model(cfg):
        processor, model = real_build(cfg)
        model.model.decoder.layers[0].fc1.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
        return processor, model

    monkeypatch.setattr(train_stream, "build_model", build_model)
    reset_accelerate_state()
    request.addfinalizer(reset_accelerate_state)
    common = ["trainer_config.max_steps=4", f"++trainer_config.{precision}=true"]
    record_keys(monkeypatch, [])
    assert train_stream.main(run_args(tmp_path / "straight", shards[0], *common)) == 0
    assert dtypes == {half}
    record_keys(monkeypatch, [], signal_at=2)  # during step 2: saved at the end of step 3 (read one step late)
    assert train_stream.main(run_args(tmp_path / "parts", shards[0], *common)) == 0
    assert (tmp_path / "parts" / "checkpoint-3").is_dir() and not (tmp_path / "parts" / "final").exists()
    record_keys(monkeypatch, [])
    assert train_stream.main(run_args(tmp_path / "parts", shards[0], *common,
                                      "trainer_config.resume_from_checkpoint=latest")) == 0

    straight, resumed = tmp_path / "straight" / "checkpoint-4", tmp_path / "parts" / "checkpoint-4"
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "parts")
    a, b = (safetensors.torch.load_file(c / "model.safetensors") for c in (straight, resumed))
    assert all(torch.equal(a[name], b[name]) for name in a)
    if precision == "fp16":
        scalers = [torch.load(c / "scaler.pt", weights_only=True) for c in (straight, resumed)]
        assert scalers[0] == scalers[1] and scalers[0]["_growth_tracker"] == 4  # 4 finite steps counted
    else:
        assert not (straight / "scaler.pt").exists()


def test_a_fresh_run_never_lands_among_another_runs_checkpoints(tmp_path, shards, caplog):
    out = tmp_path / "shared"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=6", "trainer_config.save_steps=2")) == 0
    run_a = json.loads((out / "run_info.json").read_text())["run_id"]
    a_files = {p.relative_to(out): p.read_bytes() for p in out.rglob("checkpoint-*/*")}
    assert len(a_files) > 6 and json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["run_id"] == run_a

    run_b = ("trainer_config.max_steps=4", "trainer_config.save_steps=2", "++trainer_config.save_total_limit=2")
    caplog.clear()
    assert train_stream.main(run_args(out, shards[0], *run_b)) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith(f"{out} holds run {run_a}'s files (checkpoint-2, checkpoint-4, checkpoint-6, config.yaml")
    assert "resume_from_checkpoint=latest" in error and "overwrite_output_dir=true" in error and "\n" not in error
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("checkpoint-*/*")} == a_files

    # overwrite_output_dir moves run A aside, byte for byte; run B then has the folder to itself
    assert train_stream.main(run_args(out, shards[0], *run_b, "++trainer_config.overwrite_output_dir=true")) == 0
    (aside,) = (out / "previous-runs").iterdir()
    assert aside.name.startswith(run_a) and (aside / "final").is_dir() and (aside / "metrics.jsonl").is_file()
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("checkpoint-*/*")} == a_files
    run_b_id = json.loads((out / "run_info.json").read_text())["run_id"]
    assert run_b_id != run_a and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    # another run's checkpoints among B's (one where B will save next) and an unreadable one: latest
    # picks neither, B's save moves A's aside instead of overwriting it, rotation leaves A's alone
    shutil.copytree(aside / "checkpoint-6", out / "checkpoint-8")
    shutil.copytree(aside / "checkpoint-6", out / "checkpoint-6")
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "trainer_state.json").write_text("")  # a save killed half-way
    caplog.clear()
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=6", "trainer_config.save_steps=2",
                                      "++trainer_config.save_total_limit=1",
                                      "trainer_config.resume_from_checkpoint=latest")) == 0
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in caplog.text and "checkpoint-9 has no readable" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8", "checkpoint-9"]
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["run_id"] == run_a
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["run_id"] == run_b_id
    (moved,) = [p for p in (out / "previous-runs").iterdir() if p != aside]
    assert {p.name: p.read_bytes() for p in (moved / "checkpoint-6").iterdir()} == {
        p.name: p.read_bytes() for p in (aside / "checkpoint-6").iterdir()}


def test_going_back_to_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, shards, caplog):
    """Resuming checkpoint-2 of a run that reached 6: its checkpoints 4 and 6 belong to an abandoned
    line, so they are moved aside (not deleted, not taken for the newest by latest or rotation). The
    longest caption checkpoint-2 recorded is carried to the end (set longer than any in the data here)."""
    out = tmp_path / "back"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=6", "trainer_config.save_steps=2")) == 0
    old_six = (out / "checkpoint-6" / "model.safetensors").read_bytes()
    state = out / "checkpoint-2" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "caption_tokens_longest": 99}))
    back = ("trainer_config.save_steps=2", "++trainer_config.save_total_limit=1")
    assert train_stream.main(run_args(out, shards[0], *back, "trainer_config.max_steps=5",
                                      f"trainer_config.resume_from_checkpoint={out / 'checkpoint-2'}")) == 0
    assert "later checkpoints (checkpoint-4, checkpoint-6) were moved to" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5"]  # the newest of the new line
    (aside,) = (out / "previous-runs").iterdir()
    assert (aside / "checkpoint-6" / "model.safetensors").read_bytes() == old_six
    caplog.clear()
    assert train_stream.main(run_args(out, shards[0], *back, "trainer_config.max_steps=6",
                                      "trainer_config.resume_from_checkpoint=latest")) == 0
    assert f"resumed from {out / 'checkpoint-5'} at step 5" in caplog.text
    assert checkpoint_caption_tokens(out / "checkpoint-6") == final_caption_tokens(out) == 99


def test_a_checkpoint_without_a_run_id_joins_the_folders_run(tmp_path, shards, caplog):
    """Checkpoints written before runs had ids (and before the longest caption was recorded): resumed
    by path twice, or by latest, the same run; the final model records no caption length, since the
    run saw part of its data before the record."""
    out = tmp_path / "legacy"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=4", "trainer_config.save_steps=2")) == 0
    assert final_caption_tokens(out) >= 1
    for path in [out / "run_info.json", *out.glob("checkpoint-*/trainer_state.json")]:
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                    if k not in ("run_id", "caption_tokens_longest")}))
    resume = ("trainer_config.max_steps=5", f"trainer_config.resume_from_checkpoint={out / 'checkpoint-4'}")
    assert train_stream.main(run_args(out, shards[0], *resume)) == 0
    assert f"{out / 'checkpoint-4'} predates the record of the longest training caption" in caplog.text
    run_id = json.loads((out / "run_info.json").read_text())["run_id"]
    assert train_stream.main(run_args(out, shards[0], *resume)) == 0  # again: not "belongs to another run"
    assert json.loads((out / "run_info.json").read_text())["run_id"] == run_id
    caplog.clear()
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=6",
                                      "trainer_config.resume_from_checkpoint=latest")) == 0
    assert f"resumed from {out / 'checkpoint-5'} at step 5" in caplog.text
    assert checkpoint_caption_tokens(out / "checkpoint-5") is None and final_caption_tokens(out) is None


def record_optimizer_steps(monkeypatch) -> list[dict]:
    """Per ``step`` of the run's AdamW: the learning rate it used, whether it was told to skip
    (``found_inf``, ours or GradScaler's), its own step count after it (``state[p]["step"]``), and
    whether the weights and AdamW state came out finite, and unchanged where it skipped."""
    steps, real = [], train_stream.make_optimizer

    def make_optimizer(model, tc):
        optimizer = real(model, tc)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        before = {}

        def tensors():
            return [t.detach().clone() for p in params for t in (p, *optimizer.state[p].values())]

        def pre(optimizer, args, kwargs):
            before["tensors"] = tensors()

        def post(optimizer, args, kwargs):
            after, skipped = tensors(), bool(optimizer.found_inf)
            steps.append({"lr": float(optimizer.param_groups[0]["lr"]), "skipped": skipped,
                          "step": int(optimizer.state[params[0]]["step"]),
                          "finite": all(torch.isfinite(t).all() for t in after),
                          "unchanged": len(after) == len(before["tensors"]) and all(
                              torch.equal(a, b) for a, b in zip(after, before["tensors"]))})
        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)
        return optimizer
    monkeypatch.setattr(train_stream, "make_optimizer", make_optimizer)
    return steps


def check_skipped_steps(out: Path, steps: list[dict], max_steps: int, tc) -> None:
    """What a run with skipped steps must show: the optimizer stepped ``max_steps`` times, each
    skipped call left everything as it was; every call used the schedule's learning rate of the
    optimizer's own position; the audit log has one line per call, a skipped one marked, numbered
    as the optimizer counts; metrics and the last checkpoint count applied steps only."""
    assert all(s["finite"] for s in steps) and all(s["unchanged"] for s in steps if s["skipped"])
    position = [s["step"] - (not s["skipped"]) for s in steps]  # optimizer steps before each call
    assert [s["step"] for s in steps if not s["skipped"]] == list(range(1, max_steps + 1))
    for s, at in zip(steps, position):
        assert math.isclose(s["lr"], optim.lr_at(at, tc, max_steps), rel_tol=1e-6), (steps, at)
    audit = [json.loads(line) for line in open(out / "sample_keys" / "rank-0.jsonl")]
    assert [(row["step"], row.get("skipped", False)) for row in audit] == [(at + 1, s["skipped"])
                                                                           for s, at in zip(steps, position)]
    metrics = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(metrics) == list(range(1, max_steps + 1))
    assert all(math.isclose(m["lr"], optim.lr_at(step - 1, tc, max_steps), rel_tol=1e-6)
               for step, m in metrics.items())
    checkpoint = out / f"checkpoint-{max_steps}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == max_steps
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert {int(one["step"]) for one in state.values()} == {max_steps}


def test_a_finite_loss_with_a_non_finite_gradient_skips_the_step_as_a_nan_loss_does(tmp_path, shards, monkeypatch,
                                                                                     caplog):
    """An inf in one gradient entry of the second micro-batch (its loss finite): without the check, clipping
    makes it NaN and AdamW writes NaN into the weights and moments; with it, the step is skipped."""
    steps, real_build, backwards = record_optimizer_steps(monkeypatch), train_stream.build_model, []

    def build_model(cfg):
        processor, model = real_build(cfg)

        def inf_once(grad):
            backwards.append(1)
            if len(backwards) == 2:
                grad = grad.clone()
                grad.view(-1)[0] = float("inf")
            return grad
        model.model.decoder.layers[0].fc1.weight.register_hook(inf_once)
        return processor, model

    monkeypatch.setattr(train_stream, "build_model", build_model)
    out, options = tmp_path / "o", ("trainer_config.max_steps=3", "trainer_config.save_steps=3")
    assert train_stream.main(run_args(out, shards[0], *options, "++trainer_config.log_sample_keys=true")) == 0
    assert "non-finite gradient at step 1: step skipped, 1 in a row" in caplog.text
    assert [s["skipped"] for s in steps] == [False, True, False, False]
    check_skipped_steps(out, steps, 3, load_config(overrides=run_args(out, shards[0], *options)[2:]).trainer_config)


def test_fp16_steps_the_gradient_scaler_drops_count_as_skipped(tmp_path, shards, monkeypatch, request, caplog):
    """fp16 on the CPU with a scaler that doubles its scale after every finite step: it overflows
    again and again, each time dropping the step; the run counts those as skipped, so step numbers,
    learning rate, audit log and checkpoint stay with the optimizer's own step count."""
    real_accelerator = train_stream.make_accelerator

    def make_accelerator(cfg):
        accelerator = real_accelerator(cfg)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14, growth_interval=1)
        return accelerator

    monkeypatch.setattr(train_stream, "make_accelerator", make_accelerator)
    reset_accelerate_state()
    request.addfinalizer(reset_accelerate_state)
    steps = record_optimizer_steps(monkeypatch)
    out, options = tmp_path / "o", ("trainer_config.max_steps=6", "trainer_config.save_steps=6",
                                    "++trainer_config.fp16=true")
    assert train_stream.main(run_args(out, shards[0], *options, "++trainer_config.log_sample_keys=true")) == 0
    check_skipped_steps(out, steps, 6, load_config(overrides=run_args(out, shards[0], *options)[2:]).trainer_config)
    assert sum(s["skipped"] for s in steps) >= 2, steps
    assert "(fp16: the gradient scaler lowers its scale)" in caplog.text


def test_nan_loss_steps_are_skipped_then_stop_the_run(tmp_path, shards, monkeypatch, caplog):
    real, calls = train_stream.compute_loss, []

    def nan_on(bad):
        def compute_loss(model, batch, device, **options):
            calls.append(1)
            loss, tokens = real(model, batch, device, **options)
            return (loss * float("nan") if bad(len(calls)) else loss), tokens
        return compute_loss

    monkeypatch.setattr(train_stream, "compute_loss", nan_on(lambda n: n == 2))
    steps, options = record_optimizer_steps(monkeypatch), ("trainer_config.max_steps=3", "trainer_config.save_steps=3")
    assert train_stream.main(run_args(tmp_path / "one", shards[0], *options, "++trainer_config.log_sample_keys=true")) == 0
    assert "non-finite loss at step 1" in caplog.text and len(calls) == 4  # 3 steps + the skipped one
    assert [s["skipped"] for s in steps] == [False, True, False, False]
    check_skipped_steps(tmp_path / "one", steps, 3,
                        load_config(overrides=run_args(tmp_path, shards[0], *options)[2:]).trainer_config)
    final = WhisperForConditionalGeneration.from_pretrained(tmp_path / "one" / "final")
    assert all(torch.isfinite(p).all() for p in final.parameters())

    monkeypatch.setattr(train_stream, "compute_loss", nan_on(lambda n: True))
    assert train_stream.main(run_args(tmp_path / "all", shards[0], "trainer_config.max_steps=3",
                                      "++trainer_config.max_bad_steps=2")) == 1
    assert "2 steps in a row with a NaN/inf loss" in caplog.text


def test_a_step_flagged_on_the_device_is_skipped_without_a_host_read():
    """``optimizer_step`` skips on the device where the statistics flag a NaN loss or the gradient
    norm is not finite: that leaves weights and AdamW state as they were (fused AdamW's found_inf);
    else it steps as plain torch AdamW does."""
    tc = load_config().trainer_config
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    reference = copy.deepcopy(model)
    model, optimizer = accelerator.prepare(model, train_stream.make_optimizer(model, tc))
    plain = torch.optim.AdamW(optim.param_groups(reference, tc.weight_decay), lr=1e-2,
                              betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon)
    x = torch.randn(5, 4)
    for bad in (None, "loss", None, "grad", None):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(x).square().sum().backward()
        reference(x).square().sum().backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), tc.max_grad_norm)
        if bad == "grad":  # a finite loss, yet one gradient entry is not
            model.weight.grad[0, 0] = float("inf")
        stats = torch.zeros(len(train_stream.STATS), dtype=torch.float64)
        stats[train_stream.STATS.index("bad")] = float(bad == "loss")
        reduced, skip, norm = train_stream.optimizer_step(model, optimizer, accelerator, stats, 1e-2, tc.max_grad_norm)
        assert skip.item() == (bad is not None) and math.isfinite(norm) == (bad != "grad")
        assert reduced[train_stream.STATS.index("bad_grad")] == float(bad == "grad")
        if skip:
            reference.zero_grad(set_to_none=True)
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        else:
            plain.step()
            plain.zero_grad(set_to_none=True)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
    assert all(int(state["step"]) == 3 for state in optimizer.optimizer.state.values())
    assert all(torch.isfinite(t).all() for state in optimizer.optimizer.state.values() for t in state.values())


def test_num_train_epochs_counts_a_last_partial_step():
    tc = load_config(overrides=["trainer_config.max_steps=0", "trainer_config.num_train_epochs=1",
                                "trainer_config.gradient_accumulation_steps=2"]).trainer_config
    assert train_stream.total_steps(tc, 5) == 3  # 5 batches, 2 per step: the 5th gets a step of its own
    assert train_stream.total_steps(tc, 4) == 2


def test_padding_rows_are_not_counted_as_samples(shards, tiny_processor):
    batch = next(iter(make_loader(shards[0], tiny_processor.tokenizer, batch_size=3, infinite=False)))
    batch["is_pad"] = torch.tensor([False, True, False])
    stats = torch.zeros(len(train_stream.STATS), dtype=torch.float64)
    train_stream.train_step(load_model("tiny", tiny_processor), batch, Accelerator(cpu=True), stats)
    real_tokens = int((batch["labels"][[0, 2]] != -100).sum())
    assert stats[train_stream.STATS.index("samples")] == 2 and stats[train_stream.STATS.index("tokens")] == real_tokens


def test_a_refused_start_leaves_the_output_dir_as_it_was(tmp_path, caplog):
    """A resume from an older checkpoint with changed mix weights, and a fresh run over another run's files
    (overwrite_output_dir) with nothing to train, are refused before a file of the folder is moved."""
    for name, size in (("a", 6), ("b", 10)):
        write_mel_shards(tmp_path / name, [size], prefix=name)

    def sources(weight):
        return (f"data_config.train_sources=[{{name: a, shards: '{tmp_path}/a', weight: {weight}}}, "
                f"{{name: b, shards: '{tmp_path}/b'}}]")

    def snapshot(folder: Path) -> dict:
        return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}

    out = tmp_path / "o"
    assert train_stream.main(run_args(out, "", "trainer_config.max_steps=4", "trainer_config.save_steps=2",
                                      sources(3))[2:]) == 0
    before = snapshot(out)
    assert {Path("checkpoint-2"), Path("checkpoint-4")} <= set(before)
    caplog.clear()
    assert train_stream.main(run_args(out, "", "trainer_config.max_steps=6", sources(2),
                                      f"trainer_config.resume_from_checkpoint={out / 'checkpoint-2'}")[2:]) == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith("cannot resume the data stream, its data or seed changed")
    assert snapshot(out) == before
    assert train_stream.main(run_args(out, "", sources(3), "model_config.freeze=['*']",
                                      "++trainer_config.overwrite_output_dir=true")[2:]) == 2
    assert snapshot(out) == before


def test_resume_refuses_another_seed_in_one_line(tmp_path, shards, caplog):
    out = tmp_path / "refuse"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=2")) == 0  # checkpoint-2
    caplog.clear()
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=4", "trainer_config.seed=7",
                                      "trainer_config.resume_from_checkpoint=latest")) == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error == "cannot resume the data stream, its data or seed changed: seed: saved 42, now 7"
    assert "Traceback" not in caplog.text and max(train_losses(out)) == 2  # the refused run trained nothing


def audited_keys(out: Path) -> collections.Counter:
    """(epoch, key) of every trained sample in the audit logs of all ranks."""
    rows = [json.loads(line) for path in (out / "sample_keys").glob("rank-*.jsonl") for line in open(path)]
    return collections.Counter((row["epoch"], key) for row in rows if not row.get("skipped") for key in row["keys"])


def test_a_checkpoint_of_two_processes_resumes_on_one_and_on_three(tmp_path, shards, tiny_processor):
    """Preempted on 2 processes (2 workers each), continued on 1 (batch 3, no workers) and on 3
    (1 worker each): over the two runs, the audit logs show every sample of the interrupted epoch
    trained on exactly once, and the epoch ends where the samples run out. The longest caption
    trained on is the maximum over the ranks, in the checkpoint and in both final models."""
    every = collections.Counter((0, key) for key in tar_keys(Path(shards[0])))  # 24 samples
    seed = "trainer_config.seed=0"  # its shuffle gives rank 1, not rank 0, the longest caption of the first run
    out = tmp_path / "two"
    done = launch(2, ROOT / "train_stream.py", *run_args(out, shards[0], seed, "trainer_config.max_steps=3",
                                                         "++trainer_config.dataloader_num_workers=2",
                                                         "++trainer_config.log_sample_keys=true"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / "run_info.json").read_text())["world_size"] == 2
    assert sum(audited_keys(out).values()) == 12  # 3 steps x 2 ranks x 2
    tok = tiny_processor.tokenizer
    per_rank = [longest_caption(tok, [key for line in open(out / "sample_keys" / f"rank-{rank}.jsonl")
                                      for key in json.loads(line)["keys"]]) for rank in (0, 1)]
    assert per_rank[1] > per_rank[0], per_rank  # else rank 0 alone would give the right answer
    assert checkpoint_caption_tokens(out / "checkpoint-3") == final_caption_tokens(out) == per_rank[1]

    one = tmp_path / "one"
    shutil.copytree(out, one)  # 12 samples left: 4 steps of 3 finish the epoch
    assert train_stream.main(run_args(one, shards[0], seed, "trainer_config.max_steps=7",
                                      "trainer_config.per_device_train_batch_size=3",
                                      "++trainer_config.log_sample_keys=true",
                                      "trainer_config.resume_from_checkpoint=latest")) == 0
    assert json.loads((one / "run_info.json").read_text())["world_size"] == 1
    assert audited_keys(one) == every
    assert final_caption_tokens(one) == longest_caption(tok, [key for _, key in every])

    three = tmp_path / "three"
    shutil.copytree(out, three)  # 12 samples left: 2 steps of 3 x 2 finish the epoch
    done = launch(3, ROOT / "train_stream.py", *run_args(three, shards[0], seed, "trainer_config.max_steps=5",
                                                         "++trainer_config.dataloader_num_workers=1",
                                                         "++trainer_config.log_sample_keys=true",
                                                         "trainer_config.resume_from_checkpoint=latest"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "saved by 2 processes, now 3" in done.stderr and "re-planned over the new layout" in done.stderr
    assert json.loads((three / "run_info.json").read_text())["world_size"] == 3
    assert audited_keys(three) == every
    assert final_caption_tokens(three) == longest_caption(tok, [key for _, key in every])


def test_a_process_count_accelerate_did_not_set_up_stops_the_run(tmp_path, shards, monkeypatch, caplog, capsys):
    """Launched as 2 processes (WORLD_SIZE=2), but accelerate set up one (as a plain ``Accelerator()``
    does under ``--multi_gpu`` without CUDA): each process would train alone. Both tools refuse."""
    from pipeline import launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(launch, "Accelerator", lambda cpu, **kwargs: Accelerator(**kwargs))
    caplog.clear()
    assert train_stream.main(run_args(tmp_path / "p", shards[0], "trainer_config.max_steps=1")) == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error == ("launched as 2 processes (WORLD_SIZE) but accelerate set up 1: check the accelerate "
                     "launch options")
    assert not (tmp_path / "p").exists()

    import infer_stream

    assert infer_stream.main(["--model_name", "tiny", "--shards", shards[1], "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "launched as 2 processes (WORLD_SIZE) but accelerate set up 1" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_offline_hub_id_and_bad_config_exit_2(tmp_path, shards, caplog, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = run_args(tmp_path / "o", shards[0], "model_config.name=openai/whisper-small-not-cached")
    assert train_stream.main(argv) == 2
    assert "model_config.name=tiny" in caplog.text and "Traceback" not in caplog.text
    assert train_stream.main(run_args(tmp_path / "o", shards[0], "trainer_config.max_stepz=1")) == 2
    assert "valid keys of 'trainer_config'" in capsys.readouterr().err


def test_nothing_to_train_and_shards_of_other_mel_bins_are_one_line_before_training(tmp_path, shards, caplog):
    caplog.clear()
    assert train_stream.main(run_args(tmp_path / "o", shards[0], "model_config.freeze=['*']")) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error == "model_config.freeze=['*'] leaves no parameter to train: leave some out of the patterns"
    wide = tmp_path / "m128"
    write_mel_shards(wide, [4], n_mels=128)
    for where, args in ((wide, ["--shards", str(wide)]), (wide, ["--shards", shards[0], "--val-shards", str(wide)])):
        caplog.clear()
        assert train_stream.main(run_args(tmp_path / "o", "", *args)[2:]) == 2
        (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert error == (f"{where}: the shards hold 128-bin log-mels, model tiny takes 80 (num_mel_bins): pack "
                         f"them with --n-mels 80 or use a 128-bin model")
    assert [p.name for p in (tmp_path / "o").iterdir()] == [".lock"]  # nothing written: refused before training
    bare = tmp_path / "bare"  # without index.json: the first batch tells, before its forward
    write_mel_shards(bare, [4], n_mels=128, index=False)
    for out, args in ((tmp_path / "b", ["--shards", str(bare / "000.tar")]),
                      (tmp_path / "v", ["--shards", shards[0], "--val-shards", str(bare / "000.tar"),
                                        "trainer_config.eval_steps=1"])):
        caplog.clear()
        assert train_stream.main(run_args(out, "", *args, "trainer_config.max_steps=1")[2:]) == 2
        (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert error == (f"{bare / '000.tar'}: the shards hold 128-bin log-mels, model tiny takes 80 (num_mel_bins): pack "
                         f"them with --n-mels 80 or use a 128-bin model")


def test_a_full_disk_under_the_sample_keys_log_is_one_line_and_ends_the_run(tmp_path, shards, caplog, monkeypatch):
    class FullDisk(io.StringIO):
        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = open
    monkeypatch.setattr(train_logs, "open", lambda path, *args, **kwargs: FullDisk() if "sample_keys" in str(path)
                        else real_open(path, *args, **kwargs), raising=False)
    out = tmp_path / "o"
    caplog.clear()
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=3",
                                      "++trainer_config.log_sample_keys=true")) == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error == (f"{out / 'sample_keys' / 'rank-0.jsonl'}: cannot write the sample keys log (No space left on "
                     f"device): free some space (or set trainer_config.log_sample_keys=false) and continue with "
                     f"trainer_config.resume_from_checkpoint=latest")
    assert "Traceback" not in caplog.text and not (out / "final").exists() and not list(out.glob("checkpoint-*"))


def test_data_wait_is_a_share_and_sources_seen_count_the_trained_steps(tmp_path, shards, monkeypatch):
    """The data wait of a slow batch falls in the log window of its own step; at every logged step,
    ``seen/default`` is the samples of the steps trained (batch 2, one process), not one step ahead."""
    class SlowSecondBatch(KeyRecorder):
        def __iter__(self):
            for batch in super().__iter__():
                if len(self.seen) == 2:
                    time.sleep(0.5)
                yield batch

    monkeypatch.setattr(train_stream, "make_loader",
                        lambda *args, **kwargs: SlowSecondBatch(make_loader(*args, **kwargs), []))
    out = tmp_path / "o"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=4")) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [(m["step"], m["seen/default"], m["epochs/default"]) for m in lines] == [(s, 2 * s, s / 12)
                                                                                    for s in range(1, 5)]
    assert all(0 <= m["data_wait"] <= 1 for m in lines), [m["data_wait"] for m in lines]
    assert max(lines, key=lambda m: m["data_wait"])["step"] == 2  # it waited 0.5 s for its batch


def test_help_lists_the_config_keys_and_a_typo_names_the_nearest_without_loading_torch():
    help_run = subprocess.run([sys.executable, "-X", "importtime", "train_stream.py", "--help"], cwd=ROOT,
                              env=child_env(), capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0
    assert "trainer_config:\n" in help_run.stdout and "  max_steps (int = 5000): optimizer steps" in help_run.stdout
    assert "  logging_dir (str = ${trainer_config.output_dir}/tensorboard): " in help_run.stdout
    imported = {line.split("|")[-1].strip() for line in help_run.stderr.splitlines()}
    assert not imported & {"torch", "transformers", "accelerate"}  # so --help answers at once
    typo = subprocess.run([sys.executable, "train_stream.py", "--shards", "x", "trainer_config.max_step=5"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "did you mean 'trainer_config.max_steps'?" in typo.stderr
    flag = subprocess.run([sys.executable, "train_stream.py", "--max_steps=5"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert flag.returncode == 2 and "config keys are set as trainer_config.max_steps=VALUE" in flag.stderr


def test_a_short_run_logs_its_first_and_last_step_and_says_where_things_went(tmp_path, shards, caplog):
    out = tmp_path / "o"
    with caplog.at_level(logging.INFO, logger="train_stream"):
        assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=3", "trainer_config.logging_steps=10",
                                          "trainer_config.logging_dir=${trainer_config.output_dir}/tb_logs",
                                          "--val-shards", shards[1], "trainer_config.eval_max_batches=1")) == 0
    assert sorted(train_losses(out)) == [1, 3]
    assert list((out / "tb_logs").glob("events.out.tfevents.*")) and not (out / "tensorboard").exists()
    assert "| fp32 on cpu" in caplog.text
    assert f"final model saved to {out / 'final'}" in caplog.text
    assert f"metrics in {out / 'metrics.jsonl'}; TensorBoard: tensorboard --logdir {out / 'tb_logs'}" in caplog.text


def test_push_to_hub_is_checked_before_training_and_a_failed_upload_is_one_line(tmp_path, shards, caplog, capsys,
                                                                                monkeypatch):
    from huggingface_hub import HfApi, constants

    from tests.test_hub import closed_port

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    push = ["++trainer_config.push_to_hub=true", "++trainer_config.hub_model_id=someone/captions"]
    assert train_stream.main(run_args(tmp_path / "o", shards[0], "trainer_config.max_steps=1", *push)) == 2
    assert "push_to_hub: the Hugging Face Hub" in capsys.readouterr().err and not (tmp_path / "o").exists()

    def refused(*args, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused")
    monkeypatch.setattr(train_stream, "check_push", lambda repo_id: None)  # as if the Hub went away during training
    monkeypatch.setattr(HfApi, "create_repo", refused)
    assert train_stream.main(run_args(tmp_path / "o", shards[0], "trainer_config.max_steps=1", *push)) == 1
    final = tmp_path / "o" / "final"
    assert caplog.records[-1].getMessage() == (
        f"could not push to the Hub as someone/captions (ConnectionError: [Errno 111] Connection refused); the "
        f"model is safe in {final}: upload it later with `hf upload someone/captions {final}`")
    assert (final / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------ processes

def test_two_process_run_gathers_validation_across_ranks(tmp_path, shards):
    out = tmp_path / "ddp"
    done = launch(2, ROOT / "train_stream.py",
                  *run_args(out, shards[0], "--val-shards", shards[1], "trainer_config.max_steps=3",
                            "trainer_config.per_device_train_batch_size=4", "++trainer_config.split_batches=true",
                            "trainer_config.eval_steps=3", "trainer_config.per_device_eval_batch_size=2",
                            "++trainer_config.eval_metrics=[bleu]", "++trainer_config.generation_max_new_tokens=4"))
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


def test_two_processes_learn_what_one_process_learns_from_the_same_global_batch(tmp_path):
    """DDP with batch 2 per rank = one process with batch 4 over the same samples, per the loss
    definition (the gradient is the mean of the per-rank token means; with label rows of one length
    that is the token mean of the global batch). Four samples: every step sees all of them."""
    train = tmp_path / "train"
    write_mel_shards(train, [4], caption=lambda key, j: f"a sound number {key[-1]}")
    common = ("trainer_config.max_steps=3", "trainer_config.warmup_steps=0")
    ranks = launch_ranks(tmp_path / "two", str(train), *common, "trainer_config.per_device_train_batch_size=2")
    assert train_stream.main(run_args(tmp_path / "one", str(train), *common,
                                      "trainer_config.per_device_train_batch_size=4")) == 0

    keys = sorted(tar_keys(train))
    for step in range(3):  # each step: 2 disjoint samples per rank, all 4 together
        assert sorted(ranks[0]["keys"][step] + ranks[1]["keys"][step]) == keys
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name  # DDP: one model on every rank
    one, init = final_weights(tmp_path / "one"), initial_weights()
    moved = max((one[n] - init[n]).abs().max().item() for n in one)
    differ = max((one[n] - ranks[0]["weights"][n]).abs().max().item() for n in one)
    assert moved > 2e-3 and differ < 1e-5, (moved, differ)  # Adam moves weights by ~lr per step
    two_losses, one_losses = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
    assert sorted(two_losses) == [1, 2, 3]
    assert all(abs(two_losses[s] - one_losses[s]) < 1e-5 for s in two_losses), (two_losses, one_losses)


def test_a_nan_loss_or_an_inf_gradient_on_one_rank_skips_the_step_on_both(tmp_path, shards):
    """Rank 1's second micro-batch has a NaN loss, rank 0's fourth a finite loss and an inf in one
    gradient entry: both steps are skipped on both ranks; 3 steps are applied, by the optimizer too."""
    out = tmp_path / "nan"
    ranks = launch_ranks(out, shards[0], "trainer_config.max_steps=3",
                         env={"WCS_TEST_NAN_AT": "1:2", "WCS_TEST_INF_GRAD_AT": "0:4"})
    assert [len(r["keys"]) for r in ranks] == [5, 5]  # 3 steps and the 2 skipped ones, on both ranks
    for name, weight in ranks[0]["weights"].items():
        assert torch.isfinite(weight).all() and torch.equal(weight, ranks[1]["weights"][name]), name
    err = ranks[0]["stderr"]
    assert "rank 1: non-finite loss at step 1" in err and "non-finite loss on another rank at step 1" in err
    assert "non-finite gradient at step 2: step skipped, 1 in a row" in err
    assert sorted(train_losses(out)) == [1, 2, 3]
    state = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)["state"]
    assert {int(one["step"]) for one in state.values()} == {3}


def test_sigterm_even_twice_saves_a_checkpoint_and_exits_cleanly_and_locks_its_output_dir(tmp_path, shards, caplog):
    out = tmp_path / "term"
    cmd = [sys.executable, str(ROOT / "train_stream.py"), *run_args(out, shards[0], "trainer_config.max_steps=100000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    # a second run on the same output_dir while the first one trains: refused, nothing of it written
    caplog.clear()
    assert train_stream.main(run_args(out, shards[0], "trainer_config.resume_from_checkpoint=latest")) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith(f"{out} is in use by another training run ({out / '.lock'} is locked by process {proc.pid})")
    proc.send_signal(signal.SIGTERM)
    first = ""
    while "saving a checkpoint at the end of this step" not in first and proc.poll() is None:
        first += proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)  # a scheduler's repeat within its grace period: the save still finishes
    _, err = proc.communicate(timeout=120)
    err = first + err
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM again: still saving the checkpoint" in err and "Traceback" not in err, err[-3000:]
    (ckpt,) = out.glob("checkpoint-*")
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert ckpt.name == f"checkpoint-{step}" and step >= 2 and max(train_losses(out)) == step
    assert not (out / "final").exists()


def test_a_mix_of_sources_trains_and_reports_what_each_source_gave(tmp_path, shards, caplog, capsys):
    """Two sources at 3:1 (a: 6 samples, b: 10; 12 and 4 of each 16-sample epoch): the banner gives
    each one's share, metrics.jsonl its samples seen and own epochs, the loader state its position;
    a run stopped after step 5 (mid-epoch) and resumed (with loader workers) trains on the same
    batches, into the next epoch."""
    for name, size in (("a", 6), ("b", 10)):
        write_mel_shards(tmp_path / name, [size], prefix=name)
    sources = (f"data_config.train_sources=[{{name: a, shards: '{tmp_path}/a', weight: 3}}, "
               f"{{name: b, shards: '{tmp_path}/b'}}]")
    out, parts = tmp_path / "o", tmp_path / "parts"
    common = ["trainer_config.save_steps=5", "++trainer_config.log_sample_keys=true",
              "++trainer_config.dataloader_num_workers=2", sources]
    with caplog.at_level(logging.INFO, logger="train_stream"):
        assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=10", *common)[2:]) == 0
    assert train_stream.main(run_args(parts, shards[0], "trainer_config.max_steps=5", *common)[2:]) == 0
    assert train_stream.main(run_args(parts, shards[0], "trainer_config.max_steps=10", *common,
                                      "trainer_config.resume_from_checkpoint=latest")[2:]) == 0
    keys = [(out if run == "o" else parts) / "sample_keys" / "rank-0.jsonl" for run in ("o", "parts")]
    assert keys[0].read_text() == keys[1].read_text()  # the resumed mix trains on the same batches
    assert [json.loads(line)["epoch"] for line in keys[0].read_text().splitlines()] == [0] * 8 + [1] * 2
    assert "source a: 6 samples, 12 of each epoch's 16 (75.0%) | seen 0, 0.00 of its epochs done" in caplog.text
    assert "source b: 10 samples, 4 of each epoch's 16 (25.0%)" in caplog.text
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["seen/a"] + last["seen/b"] == 20 and last["epochs/a"] == last["seen/a"] / 6
    state = json.loads((out / "checkpoint-10" / "loader_state_0.json").read_text())
    assert [(s["name"], s["seen"]) for s in state["sources"]] == [("a", last["seen/a"]), ("b", last["seen/b"])]
    assert train_stream.main(run_args(tmp_path / "o2", shards[0], sources)) == 2
    assert "--shards and data_config.train_sources both name the training data" in capsys.readouterr().err


def test_a_fit_window_trains_and_evaluates_on_its_frames_and_is_recorded_with_the_model(tmp_path, shards, monkeypatch):
    """With ``audio_window=fit`` the encoder sees each batch's longest clip rounded up to the step:
    the first loss is the HF model's on those frames, evaluation is HF ``generate`` on them, and
    final/ records the window for inference; a fixed window shorter than the clips cuts and counts them."""
    from pipeline.model import FittedWhisperEncoder, recorded_window
    from pipeline.window import AudioWindow

    batches, widths, forward = [], [], FittedWhisperEncoder.forward

    def seen(self, input_features, *args, **kwargs):
        widths.append(input_features.shape[-1])
        return forward(self, input_features, *args, **kwargs)

    def recording_make_loader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        return KeyRecorder(loader, batches, keep_batches=True) if kwargs.get("train") else loader

    monkeypatch.setattr(FittedWhisperEncoder, "forward", seen)
    monkeypatch.setattr(train_stream, "make_loader", recording_make_loader)
    out = tmp_path / "o"
    assert train_stream.main(run_args(out, shards[0], "trainer_config.max_steps=1", "--val-shards", shards[1],
                                      "model_config.audio_window=fit", "model_config.audio_window_step=0.1",
                                      "++trainer_config.eval_metrics=[bleu]",
                                      "++trainer_config.generation_max_new_tokens=4")) == 0
    assert widths and all(w % 10 == 0 and w < 3000 for w in widths)  # 5-40 frames: windows of 10-40
    batch, tok = batches[0], load_processor("tiny").tokenizer
    window = AudioWindow.parse("fit", 0.1).frames(batch["input_features"].shape[-1])
    set_seed(load_config().trainer_config.seed)
    logits = load_model("tiny")(input_features=expand_features(batch, window).float(),
                                decoder_input_ids=batch["decoder_input_ids"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert math.isclose(train_losses(out)[1], loss.item(), rel_tol=1e-5)

    final = load_model(str(out / "final")).eval()
    assert recorded_window(final) == AudioWindow("fit", None, 0.1)
    rows = {r["key"]: r["prediction"] for r in json.loads((out / "eval" / "step-1.json").read_text())}
    val = next(iter(make_loader(shards[1], tok, batch_size=5, train=False)))
    with torch.no_grad():
        window = recorded_window(final).frames(val["input_features"].shape[-1])
        encoded = final.get_encoder()(expand_features(val, window).float())
        ids = final.generate(encoder_outputs=encoded, max_new_tokens=4, language=LANGUAGE, task=TASK, do_sample=False)
    assert rows == {k: t.strip() for k, t in zip(val["keys"], tok.batch_decode(ids, skip_special_tokens=True))}

    cut = tmp_path / "cut"
    assert train_stream.main(run_args(cut, shards[0], "trainer_config.max_steps=2", "model_config.audio_window=0.02")) == 0
    lines = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert sum(m.get("cut", 0) for m in lines if m["prefix"] == "train") > 0  # clips of 5-40 frames in 2
