"""Fine-tune Whisper for audio captioning on streamed shards, with a hand-written accelerate loop.

    accelerate launch train_stream.py --shards 'data/train/<000..099>.tar' [--val-shards URLS] \
        [--config configs/main.yaml] [key=value | +key=value | ++key=value ...]

Read it top to bottom, like nanoGPT's train.py: 1 command line, 2 build, 3 loss and step,
4 evaluation, 5 logging, 6 the loop, 7 the run and main; the run folder is ``pipeline.runs`` and
``pipeline.checkpoint``. The decisions (loss, no host sync per step, skipped steps, one all-reduce
per step, the longest caption): docs/training.md, "How the loop is built".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import itertools
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.config import ConfigError, RunConfig, all_keys, keys_help, load_config, save_config
from pipeline.hub import HubError, check_push


# -------------------------------------------------------------------------------- 1. command line

def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: key=value sets a key, +key=value adds one the YAML files do not set, ++key=value "
               "either (Hydra grammar, YAML values), e.g. trainer_config.max_steps=1000 "
               "++trainer_config.bf16=true\n\nkeys (type = default): meaning\n" + keys_help())
    parser.add_argument("--shards", help="training shard URLs (sets data_config.train_shards; not with "
                                         "data_config.train_sources)")
    parser.add_argument("--val-shards", "--val_shards", dest="val_shards",
                        help="validation shard URLs (sets data_config.val_shards)")
    parser.add_argument("--config", help="main config file (default: configs/main.yaml)")
    args, overrides = parser.parse_known_args(argv)
    for option in (o for o in overrides if o.startswith("-")):
        name = option.lstrip("-").split("=")[0].replace("-", "_")
        key = next((k for k in all_keys() if k.endswith(f".{name}")), None)
        parser.error(f"unknown option {option}" + (f"; config keys are set as {key}=VALUE" if key else
                                                   "; overrides look like key=value (--help lists the keys)"))
    return args, overrides


def build_config(argv: list[str] | None) -> RunConfig:
    """The run's config from the command line; for ``push_to_hub``, the Hub is asked now whether the
    push can work, not after training."""
    args, overrides = parse_args(argv)
    values = {"data_config.train_shards": args.shards, "data_config.val_shards": args.val_shards}
    cfg = load_config(args.config, overrides, {k: v for k, v in values.items() if v is not None})
    if args.shards is not None and cfg.data_config.train_sources:
        raise ConfigError("--shards and data_config.train_sources both name the training data: use one")
    if not (cfg.data_config.train_shards or cfg.data_config.train_sources):
        raise ConfigError("no training shards: pass --shards URLS or set data_config.train_shards "
                          "or data_config.train_sources")
    if cfg.trainer_config.push_to_hub:
        try:
            check_push(cfg.trainer_config.hub_model_id)
        except HubError as error:
            raise ConfigError(f"push_to_hub: {error}") from None
    return cfg


def config_or_report(argv: list[str] | None) -> RunConfig | None:
    """``build_config``, or None after printing why it cannot be built."""
    try:
        return build_config(argv)
    except ConfigError as error:
        print(f"train_stream: {error}", file=sys.stderr)
        return None


if __name__ == "__main__":  # --help and a mistake on the command line answer before the heavy imports below
    CLI_CONFIG = config_or_report(sys.argv[1:]) or sys.exit(2)

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.models.whisper.modeling_whisper import (WhisperDecoder, WhisperDecoderLayer, WhisperEncoder,
                                                          WhisperEncoderLayer)

from pipeline import launch
from pipeline.checkpoint import load_checkpoint, save_checkpoint, save_final, start_run, write_failure
from pipeline.collate import Collator, expand_features
from pipeline.data_settings import DEFAULT_SOURCE
from pipeline.decode import GRAPHS
from pipeline.metrics import score
from pipeline.model import ModelLoadError, generate_captions, load_model, load_processor
from pipeline.optim import make_optimizer, next_lr, set_lr
from pipeline.runs import CONFIG, METRICS, Claim, RunInfo, TrainerState, eval_file
from pipeline.stream import StreamError, make_loader
from pipeline.train_logs import MetricsLog, SampleKeysLog, TrainingError, write_error
from pipeline.window import AudioWindow, loses_audio
from shard_tools.fileio import write_json

log = logging.getLogger("train_stream")
STATS = ("loss", "samples", "tokens", "wait_s", "bad", "bad_grad", "stop", "skipped", "cut")  # the per-step all-reduce
# what a step sends to the host: the reduced STATS, this rank's bad-loss flag, the gradient norm, the lr
HOST_VALUES = (*STATS, "local_bad", "grad_norm", "lr")


# ------------------------------------------------------------- 2. build: accelerator, model, data, optimizer

def make_accelerator(cfg: RunConfig) -> Accelerator:
    tc = cfg.trainer_config
    precision = "bf16" if tc.bf16 else "fp16" if tc.fp16 else "no"
    try:
        accelerator = launch.make_accelerator(mixed_precision=precision,
                                              gradient_accumulation_steps=tc.gradient_accumulation_steps)
    except launch.LaunchError as error:
        raise TrainingError(str(error)) from error
    if not logging.getLogger().handlers:  # keep handlers someone else set up (a caller, pytest)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    return accelerator


def device_batch_size(batch_size: int, split_batches: bool, world_size: int, key: str) -> int:
    """The batch each process loads: ``batch_size``, or its share of it with ``split_batches``."""
    if not split_batches:
        return batch_size
    if batch_size % world_size:
        raise ConfigError(f"trainer_config.{key}={batch_size} with split_batches=true must be divisible "
                          f"by the number of processes ({world_size})")
    return batch_size // world_size


def build_model(cfg: RunConfig):
    """The processor and the model to train: with ``lora_r``, a peft ``PeftModel`` around it."""
    mc = cfg.model_config
    processor = load_processor(mc.name)
    model = load_model(mc.name, processor, attn_implementation=mc.attn_implementation)
    apply_model_options(model, mc)
    model = add_lora(model, mc) if mc.lora_r else model
    if not any(p.requires_grad for p in model.parameters()):
        encoder = " with freeze_encoder=true" if mc.freeze_encoder else ""
        raise ConfigError(f"model_config.freeze={list(mc.freeze)}{encoder} leaves no parameter to train: "
                          f"leave some out of the patterns")
    return processor, model


def apply_model_options(model, mc) -> None:
    """Dropout, SpecAugment, frozen encoder and ``freeze`` patterns, gradient checkpointing on a
    loaded model. Frozen parameters are left out of the optimizer (``param_groups``), so weight
    decay does not move them either.

    SpecAugment fields are read from ``model.config`` at every forward; dropout is copied into the
    modules when they are built, so it is set on them too (and in the config, for ``save_pretrained``).
    """
    for name in ("apply_spec_augment", "mask_time_prob", "mask_time_length", "mask_time_min_masks",
                 "mask_feature_prob", "mask_feature_length", "mask_feature_min_masks", "dropout"):
        setattr(model.config, name, getattr(mc, name))
    for module in model.modules():
        if isinstance(module, (WhisperEncoder, WhisperDecoder, WhisperEncoderLayer, WhisperDecoderLayer)):
            module.dropout = mc.dropout
    if mc.freeze_encoder:
        model.model.encoder.requires_grad_(False)
    freeze(model, mc.freeze)
    if mc.gradient_checkpointing:
        model.config.use_cache = False
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def freeze(model, patterns: list[str]) -> None:
    """No gradient for the parameters whose names match one of ``patterns`` (``fnmatch``, e.g.
    ``model.encoder.layers.[0-3].*``); a pattern that matches no parameter is a ``ConfigError``,
    since a typo would otherwise train everything unseen."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"model_config.freeze: '{pattern}' matches no parameter name; names look like "
                              f"{', '.join(names[:2])}, model.encoder.layers.0.fc1.weight, "
                              f"model.decoder.layers.0.self_attn.q_proj.weight")
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            param.requires_grad_(False)


def add_lora(model, mc):
    """``model`` inside a peft ``PeftModel`` with LoRA adapters on ``lora_target_modules``: only the
    adapters train (``save_final`` merges them into the weights)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("model_config.lora_r > 0 needs peft: pip install 'whisper-caption-stream[lora]' "
                          "(or pip install peft), or set model_config.lora_r=0") from None
    config = peft.LoraConfig(r=mc.lora_r, lora_alpha=mc.lora_alpha, lora_dropout=mc.lora_dropout,
                             target_modules=list(mc.lora_target_modules))
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # target modules not found in the model
        raise ConfigError(f"model_config.lora_target_modules={list(mc.lora_target_modules)}: "
                          f"{str(error).splitlines()[0]}") from None


def build_loader(cfg: RunConfig, tokenizer, accelerator: Accelerator, train: bool):
    dc, tc = cfg.data_config, cfg.trainer_config
    key = "per_device_train_batch_size" if train else "per_device_eval_batch_size"
    batch_size = device_batch_size(getattr(tc, key), tc.split_batches, accelerator.num_processes, key)
    settings = dc.settings(
        batch_size=batch_size, seed=tc.seed, infinite=train, num_workers=tc.dataloader_num_workers,
        prefetch_factor=tc.dataloader_prefetch_factor, pin_memory=tc.dataloader_pin_memory and torch.cuda.is_available(),
        persistent_workers=tc.dataloader_persistent_workers and tc.dataloader_num_workers > 0,
        full_batches=train)  # one batch shape in training: a short last batch would compile another graph
    if not train:  # validation samples are all DEFAULT_SOURCE's: one prompt for the split
        prefix = dc.val_prefix()
        settings = dataclasses.replace(settings, prefixes=((DEFAULT_SOURCE, prefix),) if prefix else ())
    return make_loader(dc.sources() if train else dc.val_shards, tokenizer, settings, train=train,
                       rank=accelerator.process_index, world_size=accelerator.num_processes,
                       device=accelerator.device)


def total_steps(tc, batches_per_epoch: int) -> int:
    if tc.max_steps > 0:
        return tc.max_steps
    return max(1, math.ceil(tc.num_train_epochs * batches_per_epoch / tc.gradient_accumulation_steps))


def check_mel_bins(cfg: RunConfig, takes: int, n_mels: int | None, val: bool = False) -> None:
    """A ``ConfigError`` naming the training (``val``: validation) shards if their ``n_mels`` is not
    the model's ``takes``: known from index.json at start-up, else (None there) from each batch before
    its forward (the stream holds a shard's samples to its first's)."""
    if n_mels not in (None, takes):
        dc = cfg.data_config
        urls = dc.val_shards if val else " + ".join(str(s.shards) for s in dc.sources())
        raise ConfigError(f"{urls}: the shards hold {n_mels}-bin log-mels, model {cfg.model_config.name} takes "
                          f"{takes} (num_mel_bins): pack them with --n-mels {takes} or use a {n_mels}-bin model")


@dataclasses.dataclass
class Parts:
    """What a run trains: ``prepare_run``'s model and optimizer (through ``accelerator.prepare``),
    its processor, and the loaders (each rank's share; ``val_loader`` None without validation shards)."""

    processor: Any
    model: Any
    optimizer: Any
    loader: Any
    val_loader: Any | None


def prepare_run(cfg: RunConfig, accelerator: Accelerator) -> Parts:
    """Model, processor, loaders, optimizer."""
    tc = cfg.trainer_config
    set_seed(tc.seed)
    processor, model = build_model(cfg)
    set_seed(tc.seed, device_specific=True)  # dropout and SpecAugment draws differ between ranks
    loader = build_loader(cfg, processor.tokenizer, accelerator, train=True)
    val_loader = (build_loader(cfg, processor.tokenizer, accelerator, train=False)
                  if cfg.data_config.val_shards else None)
    for one, val in ((loader, False), (val_loader, True)):
        check_mel_bins(cfg, model.config.num_mel_bins, one.dataset.n_mels if one else None, val)
    if cfg.model_config.torch_compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, tc))
    return Parts(processor, model, optimizer, loader, val_loader)


# ----------------------------------------------------------------------------- 3. loss and step

def caption_loss(logits: torch.Tensor, labels: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropy (with ``label_smoothing``, torch's) over ``labels != -100`` and
    the number of those tokens.

    logits ``[B, T, V]``, labels ``[B, T]``. With no real token the sum is 0 and still depends on every
    logit (zero gradient), which keeps DDP's gradient reduction in step on all-padding batches.
    """
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum",
                            label_smoothing=label_smoothing)
    return total, (labels != -100).sum()


def batch_features(batch: dict, window: AudioWindow, device) -> torch.Tensor:
    """A compact batch's features in the encoder ``window`` on ``device``: ``[B, n_mels, frames]``."""
    frames = window.frames(batch["input_features"].shape[-1])
    return expand_features(batch, frames, device=device, dtype=torch.float32)


def forward_logits(model, batch: dict, device, features: torch.Tensor | None = None,
                   window: AudioWindow = AudioWindow()) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits ``[B, T, V]`` and labels ``[B, T]`` (padding samples all -100) for a
    compact batch; ``features``: its ``batch_features`` on ``device``, if already made."""
    if features is None:
        features = batch_features(batch, window, device)  # [B, n_mels, frames]
    labels = batch["labels"].to(device, non_blocking=True)  # [B, T]
    labels = labels.masked_fill(batch["is_pad"].to(device, non_blocking=True)[:, None], -100)
    # the collator's, not the labels shifted right: those have the forced caption prefix as -100
    decoder_input_ids = batch["decoder_input_ids"].to(device, non_blocking=True)  # [B, T]
    logits = model(input_features=features, decoder_input_ids=decoder_input_ids, use_cache=False).logits
    return logits, labels


def compute_loss(model, batch: dict, device, label_smoothing: float = 0.0,
                 window: AudioWindow = AudioWindow()) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch loss (token mean, = HF's ``model(..., labels=labels).loss`` without
    ``label_smoothing``) and its token count."""
    logits, labels = forward_logits(model, batch, device, window=window)
    total, tokens = caption_loss(logits, labels, label_smoothing)
    return total / tokens.clamp(min=1), tokens


def train_step(model, batch: dict, accelerator: Accelerator, stats: torch.Tensor, label_smoothing: float = 0.0,
               window: AudioWindow = AudioWindow()) -> None:
    """Forward and backward of one micro-batch inside ``accelerator.accumulate``; adds to ``stats``."""
    with accelerator.accumulate(model):
        loss, tokens = compute_loss(model, batch, accelerator.device, label_smoothing=label_smoothing, window=window)
        accelerator.backward(loss)
    loss = loss.detach().double()
    stats[STATS.index("loss")] += loss
    stats[STATS.index("bad")] += (~torch.isfinite(loss)).double()
    stats[STATS.index("tokens")] += tokens
    stats[STATS.index("samples")] += len(batch["is_pad"]) - int(batch["is_pad"].sum())  # on the host: no sync
    cut = loses_audio(batch["frames"], window.frames(batch["input_features"].shape[-1]))  # [B], on the host
    stats[STATS.index("cut")] += int(cut.sum())


class Stepped(NamedTuple):
    """What ``optimizer_step`` leaves on the device."""

    reduced: torch.Tensor  # [len(STATS)]: the statistics summed over ranks
    skip: torch.Tensor  # whether the optimizer skipped the step (a non-finite loss or gradient norm)
    grad_norm: torch.Tensor  # before clipping


def optimizer_step(model, optimizer, accelerator: Accelerator, stats: torch.Tensor, lr: float | torch.Tensor,
                   max_grad_norm: float) -> Stepped:
    """Clip (fp16: after unscaling); all-reduce ``stats`` (``STATS``) with this rank's flag for a
    non-finite gradient norm; step with ``lr`` unless a loss or the gradient norm was not finite on
    some rank (``skip``, decided on the device, never read on the host); zero. Returns the reduced
    statistics, ``skip`` and the gradient norm before clipping. With fp16's ``GradScaler`` the scaler
    passes its own ``found_inf``: set by a non-finite gradient, as ``skip`` is (a NaN/inf loss makes
    NaN gradients, which DDP averages into every rank)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    stats[STATS.index("bad_grad")] = (~torch.isfinite(norm)).double()
    reduced = accelerator.reduce(stats.clone(), "sum")
    skip = reduced[STATS.index("bad")] + reduced[STATS.index("bad_grad")] > 0
    set_lr(optimizer, lr)
    if accelerator.scaler is not None:
        optimizer.step()
    else:
        inner = optimizer.optimizer  # what AcceleratedOptimizer steps
        inner.found_inf = skip.float()
        optimizer.step()
        del inner.found_inf
    optimizer.zero_grad(set_to_none=True)
    return Stepped(reduced, skip, norm)


# --------------------------------------------------------------------------------- 4. evaluation

def generate_prompted(model, features: torch.Tensor, sources: list[str], collator: Collator,
                      **options) -> list[list[int]]:
    """Caption ids of each row of ``features``, prompted with its own source's prefix, as in
    training: one ``generate_captions`` call per distinct prefix."""
    groups = {}
    for row, source in enumerate(sources):
        groups.setdefault(tuple(collator.prompt(source)), []).append(row)
    out = [None] * len(sources)
    for prefix, rows in groups.items():
        tokens = generate_captions(model, features[rows], prefix_ids=prefix, **options)  # [rows, T]
        for row, ids in zip(rows, tokens.tolist()):
            out[row] = ids
    return out


@torch.no_grad()
def evaluate(model, loader, start_state: dict, accelerator: Accelerator, tokenizer, tc,
             check_batch, window: AudioWindow = AudioWindow()) -> tuple[dict, list]:
    """Validation loss (token mean over all ranks, no label smoothing) and captions (greedy, or
    ``generation_num_beams`` beams; each row prompted with its source's prefix) on at most
    ``eval_max_batches`` batches per rank, gathered across ranks, padding samples left out, scored
    on the main process. ``check_batch(batch)`` runs before each batch's forward."""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # the Whisper model itself (a PeftModel's, adapters active in it): the decoder reads its parts
    unwrapped = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    unwrapped.eval()
    loader.load_state_dict(start_state)  # every evaluation reads the same batches from the start
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [CE sum, tokens]
    rows = []
    batches = min(tc.eval_max_batches, len(loader))
    for batch in tqdm(itertools.islice(loader, batches), total=batches, desc="eval", unit="batch", leave=False,
                      disable=not accelerator.is_main_process, dynamic_ncols=True):
        check_batch(batch)
        with accelerator.autocast():
            features = batch_features(batch, window, accelerator.device)  # [B, n_mels, frames]
            logits, labels = forward_logits(unwrapped, batch, accelerator.device, features)
            total, tokens = caption_loss(logits, labels)
            ids = generate_prompted(unwrapped, features, batch["sources"], loader.dataset.collator,
                                    num_beams=tc.generation_num_beams, max_new_tokens=tc.generation_max_new_tokens)
        sums += torch.stack([total.double(), tokens.double()])
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        rows += [{"key": key, "prediction": text.strip(), "references": refs}
                 for key, text, refs, pad in zip(batch["keys"], texts, batch["captions"], batch["is_pad"].tolist())
                 if not pad]
    unwrapped.train()
    GRAPHS.clear()  # a decoder graph's buffers (GBs at whisper-small widths) would sit through training
    sums = accelerator.reduce(sums, "sum")
    rows = gather_object(rows)
    metrics = {"loss": (sums[0] / sums[1].clamp(min=1)).item(), "samples": float(len(rows))}
    if accelerator.is_main_process and rows:
        result = score([r["prediction"] for r in rows], [r["references"] for r in rows],
                        metrics=tuple(tc.eval_metrics))
        metrics.update({name: m["value"] for name, m in result["metrics"].items() if m.get("available")})
    return metrics, rows


# ------------------------------------------------------------------------------------ 5. logging

class Window:
    """Sums of the reduced per-step statistics since the last log line, over the time from its first
    step's launch (the one after the last logged step is launched before that step is read), eval and
    save time excluded: so the data wait it sums lies inside the time it divides by."""

    def __init__(self, micro_batches_per_step: int):
        self.micro, self.start, self.pauses = micro_batches_per_step, None, []  # pauses: (start, seconds)
        self.steps, self.sums, self.grad_norm = 0, dict.fromkeys(STATS, 0.0), 0.0

    def add(self, values: dict, grad_norm: float, launched_at: float) -> None:
        self.start = launched_at if self.start is None else self.start
        self.steps += 1
        self.grad_norm += grad_norm
        for name in STATS:
            self.sums[name] += values[name]

    def metrics(self, lr: float, world_size: int, skipped: float) -> dict:
        elapsed = time.perf_counter() - self.start - sum(s for at, s in self.pauses if at >= self.start)
        return {"loss": self.sums["loss"] / (self.steps * self.micro), "lr": lr,
                "grad_norm": self.grad_norm / self.steps, "samples_per_s": self.sums["samples"] / elapsed,
                "tokens_per_s": self.sums["tokens"] / elapsed,
                "data_wait": self.sums["wait_s"] / world_size / elapsed, "skipped": skipped,
                **({"cut": self.sums["cut"]} if self.sums["cut"] else {})}  # clips longer than a fixed window


def banner(cfg: RunConfig, accelerator: Accelerator, model, loader, max_steps: int, start_step: int) -> dict:
    tc = cfg.trainer_config
    world = accelerator.num_processes
    per_device = device_batch_size(tc.per_device_train_batch_size, tc.split_batches, world,
                                   "per_device_train_batch_size")
    info = {"world_size": world, "per_device_batch_size": per_device,
            "gradient_accumulation_steps": tc.gradient_accumulation_steps,
            "effective_batch_size": per_device * world * tc.gradient_accumulation_steps,
            "max_steps": max_steps, "start_step": start_step, "train_samples": loader.num_samples,
            "batches_per_epoch_per_rank": len(loader),
            "mixed_precision": "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision,
            "model": cfg.model_config.name, "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "device": str(accelerator.device), "sources": loader.progress()}
    epochs = max_steps * tc.gradient_accumulation_steps / max(1, len(loader))
    log.info("world size %d | batch %d per device, %d effective (x%d accumulation) | %d steps (%.2f epochs) "
             "| data: %d samples, %d batches per rank per epoch | model %s, %.1f M parameters (%s trainable) "
             "| %s on %s", world, per_device, info["effective_batch_size"], tc.gradient_accumulation_steps,
             max_steps, epochs, loader.num_samples, len(loader), info["model"], info["parameters"] / 1e6,
             f"{info['trainable_parameters'] / 1e6:.3g} M", info["mixed_precision"], info["device"])
    for source in info["sources"]:
        log.info("source %s: %d samples, %d of each epoch's %d (%.1f%%) | seen %d, %.2f of its epochs done",
                 source["name"], source["samples"], source["per_epoch"], loader.num_samples,
                 100 * source["per_epoch"] / loader.num_samples, source["seen"], source["epochs"])
    return info


def source_metrics(loader, epoch: int, batches: int) -> dict:
    """Per source: samples handed to training (all ranks) up to the stream position ``(epoch, batches)``
    (the loader has handed out the step in flight too) and its own epochs they make."""
    ds = loader.dataset
    seen = ds.seen(epoch, loader.layout, batches)
    return {f"{what}/{name}": float(value) for name, size, n in zip(ds.mix.names, ds.mix.sizes, seen)
            for what, value in (("seen", n), ("epochs", n / size))}


# ----------------------------------------------------------------------------------- 6. the loop

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by SIGTERM or SIGINT: the loop saves a checkpoint at the end of the step and exits 0. A
    second signal (either) is only noted: a scheduler may repeat SIGTERM within its grace period, and
    the save must finish; a third has its default effect, the process ends at once, without a checkpoint."""

    def __init__(self):
        self.signum, self.count = None, 0

    def handle(self, signum, frame) -> None:
        self.signum, self.count = self.signum or signum, self.count + 1
        name = signal.Signals(signum).name
        if self.count == 1:
            log.warning("%s: saving a checkpoint at the end of this step, then stopping", name)
            return
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        log.warning("%s again: still saving the checkpoint; a third signal stops at once, without it", name)


@contextlib.contextmanager
def stop_on_signals():
    stop = StopRequest()
    previous = {s: signal.signal(s, stop.handle) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_bad_step(local_bad: bool, loss_bad: bool, keys: list[str], step: int, in_a_row: int, max_bad: int,
                   accelerator: Accelerator) -> int:
    """Report a step skipped for a NaN/inf loss (``local_bad``: this rank's, ``loss_bad``: any rank's)
    or else gradient (fp16: the scaler's routine overflow, only noted); raise after ``max_bad`` in a
    row. Returns the new count."""
    in_a_row += 1
    if local_bad:
        log.warning("rank %d: non-finite loss at step %d (keys %s): step skipped, %d in a row",
                    accelerator.process_index, step, keys[:8], in_a_row)
    elif loss_bad and accelerator.is_main_process:
        log.warning("non-finite loss on another rank at step %d: step skipped, %d in a row", step, in_a_row)
    elif not loss_bad and accelerator.is_main_process:  # the same gradients, so norm, on every rank
        log.log(logging.INFO if accelerator.scaler is not None else logging.WARNING,
                "non-finite gradient at step %d%s: step skipped, %d in a row", step,
                " (fp16: the gradient scaler lowers its scale)" if accelerator.scaler is not None else "", in_a_row)
    if in_a_row >= max_bad:
        raise TrainingError(f"{in_a_row} steps in a row with a NaN/inf loss or gradient (last at step {step}): "
                            f"lower trainer_config.learning_rate, check the data, or use bf16 instead of fp16")
    return in_a_row


@dataclasses.dataclass
class Launched:
    """An optimizer step queued on the device, its statistics on their way to the host."""

    values: torch.Tensor  # [len(HOST_VALUES)]: named by HOST_VALUES
    copied: torch.cuda.Event | None  # done when ``values`` holds them (None: already there)
    skip: torch.Tensor  # on the device: whether the optimizer skipped it
    keys: list[str]  # the real (not padding) keys of its micro-batches on this rank
    epoch: int  # the epoch of its first micro-batch
    launched_at: float  # perf_counter when its first micro-batch was asked for
    loader_epoch: int  # the loader's position after its micro-batches: epoch,
    loader_batches: int  # and batches handed out in it

    def read(self) -> dict[str, float]:
        """Its ``HOST_VALUES`` by name, waiting for the device if it is still at it."""
        if self.copied is not None:
            self.copied.synchronize()
        return dict(zip(HOST_VALUES, self.values.tolist()))


def to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``values`` to (pinned) host memory without waiting; an event marks the end."""
    if values.device.type != "cuda":
        return values, None
    host = values.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


@dataclasses.dataclass
class Logs:
    """The run's log files (``pipeline.train_logs``)."""

    metrics: MetricsLog
    samples: SampleKeysLog

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()


class Trainer:
    """The loop's state between steps: what it trains (``parts``), from where (``start``: the step,
    run and longest caption a checkpoint resumes, or step 0), where it logs, and when it last saved."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator, parts: Parts, start: TrainerState,
                 stop: StopRequest):
        self.cfg, self.tc, self.accelerator, self.parts, self.stop = cfg, cfg.trainer_config, accelerator, parts, stop
        self.output_dir, self.run_id = Path(self.tc.output_dir), start.run_id
        self.max_steps = total_steps(self.tc, len(parts.loader))
        self.val_start = parts.val_loader.state_dict() if parts.val_loader is not None else None
        self.start_step = self.step = self.saved_step = start.step
        self.evaluated_step = -1
        self.caption_tokens = start.caption_tokens  # this rank's longest training caption so far (None: not known)
        self.mel_bins = accelerator.unwrap_model(parts.model, keep_torch_compile=False).config.num_mel_bins
        self.audio_window = cfg.model_config.window()
        self.logs: Logs | None = None

    def run(self, logs: Logs) -> bool:
        """Train from the start step to ``max_steps``; True if stopped early by a signal. At most one
        step is in flight: its statistics are read after the next step is launched, so the host
        never waits for the device between steps, or at once when an evaluation, a checkpoint, the
        end or a stop comes after it (docs/training.md, 'No host sync per step')."""
        self.logs, self.bad_in_a_row = logs, 0
        self.window = Window(self.accelerator.num_processes * self.tc.gradient_accumulation_steps)
        batches, flight = iter(self.parts.loader), None
        while self.step + (flight is not None) < self.max_steps:
            in_flight = None if flight is None else flight.skip
            launched = self.launch(batches, next_lr(self.step, in_flight, self.tc, self.max_steps,
                                                    self.accelerator.device))
            stop = flight is not None and self.settle(flight)
            flight = launched
            if stop or self.due(self.step + 1):
                stop = self.settle(flight) or stop
                flight = None
            if stop:
                self.save()
                return True
        return False

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` is followed by work that needs its weights (or is the last)."""
        tc = self.tc
        return (step >= self.max_steps or step % tc.save_steps == 0
                or (self.parts.val_loader is not None and step % tc.eval_steps == 0))

    def launch(self, batches, lr: torch.Tensor) -> Launched:
        """One optimizer step, queued on the device; skipped there if any rank's loss or gradient
        norm is not finite."""
        launched_at, loader = time.perf_counter(), self.parts.loader
        stats, keys, epoch = self.accumulate(batches)
        stats[STATS.index("stop")] = float(self.stop.signum is not None)
        stats[STATS.index("skipped")] = float(loader.skipped)
        stepped = optimizer_step(self.parts.model, self.parts.optimizer, self.accelerator, stats, lr,
                                 self.tc.max_grad_norm)
        values, copied = to_host(torch.cat([stepped.reduced, stats[STATS.index("bad")].view(1),
                                            stepped.grad_norm.double().view(1), lr.double().view(1)]))
        return Launched(values=values, copied=copied, skip=stepped.skip, keys=keys, epoch=epoch, launched_at=launched_at,
                        loader_epoch=loader.epoch, loader_batches=loader.batches)

    def settle(self, launched: Launched) -> bool:
        """Read a launched step's statistics (waiting for the device if it is still at it): count it
        or report it skipped; log, evaluate and save after it as due. Returns its stop flag."""
        tc, accelerator, logs = self.tc, self.accelerator, self.logs
        values = launched.read()
        if values["bad"] or values["bad_grad"]:
            logs.samples.write(self.step + 1, launched.epoch, launched.keys, skipped=True)
            self.bad_in_a_row = check_bad_step(values["local_bad"] > 0, values["bad"] > 0, launched.keys, self.step,
                                               self.bad_in_a_row, tc.max_bad_steps, accelerator)
            return bool(values["stop"])
        self.bad_in_a_row = 0
        self.step += 1
        logs.samples.write(self.step, launched.epoch, launched.keys)
        logs.metrics.bar.update(1)
        self.window.add(values, values["grad_norm"], launched.launched_at)
        if self.step % tc.logging_steps == 0 or self.step in (self.start_step + 1, self.max_steps):
            metrics = self.window.metrics(values["lr"], accelerator.num_processes, values["skipped"])
            if logs.metrics.main:  # arithmetic on the loader's position, the same on every rank
                metrics |= source_metrics(self.parts.loader, launched.loader_epoch, launched.loader_batches)
            logs.metrics.log_metrics(self.step, metrics, "train")
            self.window = Window(self.window.micro)
        paused = time.perf_counter()
        if self.parts.val_loader is not None and self.step % tc.eval_steps == 0:
            self.evaluate()
        if self.step % tc.save_steps == 0:
            self.save()
        self.window.pauses.append((paused, time.perf_counter() - paused))
        return bool(values["stop"])

    def accumulate(self, batches) -> tuple[torch.Tensor, list[str], int]:
        """Forward/backward of ``gradient_accumulation_steps`` micro-batches: the local statistics,
        the real (not padding) keys trained on, and the epoch of the first micro-batch. The data wait
        is the time blocked in ``next``: the device's queue is not waited on here."""
        stats = torch.zeros(len(STATS), dtype=torch.float64, device=self.accelerator.device)
        keys, epoch = [], None
        for _ in range(self.tc.gradient_accumulation_steps):
            waited = time.perf_counter()
            batch = next(batches)
            stats[STATS.index("wait_s")] += time.perf_counter() - waited
            check_mel_bins(self.cfg, self.mel_bins, batch["input_features"].shape[1])
            epoch = self.parts.loader.epoch if epoch is None else epoch
            train_step(self.parts.model, batch, self.accelerator, stats, self.tc.label_smoothing, self.audio_window)
            if self.caption_tokens is not None:
                self.caption_tokens = max(self.caption_tokens, batch["longest_caption_tokens"])
            keys += [key for key, pad in zip(batch["keys"], batch["is_pad"].tolist()) if not pad]
        return stats, keys, epoch

    def evaluate(self) -> None:
        if self.evaluated_step == self.step:
            return
        metrics, rows = evaluate(self.parts.model, self.parts.val_loader, self.val_start, self.accelerator,
                                 self.parts.processor.tokenizer, self.tc, lambda batch: check_mel_bins(
                                     self.cfg, self.mel_bins, batch["input_features"].shape[1], val=True),
                                 self.audio_window)
        path = eval_file(self.output_dir, self.step)
        if self.accelerator.is_main_process and (failed := write_failure(
                lambda: (path.parent.mkdir(exist_ok=True), write_json(path, rows)))):
            raise write_error(path, "the evaluation's captions", failed)
        self.logs.metrics.log_metrics(self.step, metrics, "eval")
        self.evaluated_step = self.step

    def save(self) -> None:
        if self.saved_step != self.step:
            state = TrainerState(step=self.step, world_size=self.accelerator.num_processes, run_id=self.run_id,
                                 caption_tokens=self.longest_caption())
            save_checkpoint(self.output_dir, state, self.parts.model, self.parts.optimizer, self.parts.loader,
                            self.accelerator, self.cfg)
            self.saved_step = self.step

    def longest_caption(self) -> int | None:
        """The longest caption trained on so far over all ranks (a collective: every rank calls it);
        None where a rank does not know it (all ranks resumed from the same checkpoint, so all alike)."""
        if self.accelerator.num_processes == 1:
            return self.caption_tokens
        mine = torch.tensor([-1 if self.caption_tokens is None else self.caption_tokens],
                            device=self.accelerator.device)
        every = self.accelerator.gather(mine).tolist()
        return None if min(every) < 0 else max(every)


# ---------------------------------------------------------------------------- 7. the run and main

def push_to_hub(folder: Path, repo_id: str, step: int) -> None:
    """Upload ``folder``; a failure is one ``TrainingError`` line saying the model is safe and how to
    upload it later (the id, token and Hub were checked before training: this is the network or Hub)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"whisper-caption-stream, step {step}")
    except Exception as error:  # httpx, huggingface_hub and OS errors alike: all mean "not uploaded"
        raise TrainingError(f"could not push to the Hub as {repo_id} ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}); the model is safe in {folder}: "
                            f"upload it later with `hf upload {repo_id} {folder}`") from None
    log.info("pushed %s to the Hub as %s", folder, repo_id)


def run(cfg: RunConfig, accelerator: Accelerator, stop: StopRequest) -> int:
    with contextlib.ExitStack() as lock:
        claim = start_run(Path(cfg.trainer_config.output_dir), cfg.trainer_config, accelerator, lock)
        return train(cfg, accelerator, stop, claim)


def train(cfg: RunConfig, accelerator: Accelerator, stop: StopRequest, claim: Claim) -> int:
    tc, output_dir = cfg.trainer_config, Path(cfg.trainer_config.output_dir)
    parts = prepare_run(cfg, accelerator)
    start = (load_checkpoint(claim.checkpoint, parts.model, parts.optimizer, parts.loader, accelerator)
             if claim.checkpoint else TrainerState(step=0, world_size=accelerator.num_processes, caption_tokens=0))
    trainer = Trainer(cfg, accelerator, parts, dataclasses.replace(start, run_id=claim.run_id), stop)
    if claim.aside is not None:  # every check passed: now the folder may change
        claim.aside.apply(output_dir)
    if accelerator.is_main_process:
        save_config(cfg, output_dir / CONFIG)
        info = banner(cfg, accelerator, parts.model, parts.loader, trainer.max_steps, start.step)
        RunInfo(claim.run_id, str(claim.checkpoint.resolve()) if claim.checkpoint else None).write(output_dir, info)
    accelerator.wait_for_everyone()
    samples = SampleKeysLog(output_dir, accelerator, start.step, tc.log_sample_keys)
    logs = Logs(MetricsLog(output_dir, Path(tc.logging_dir), accelerator, trainer.max_steps, start.step), samples)
    try:
        if trainer.run(logs):
            log.info("stopped at step %d; continue with trainer_config.resume_from_checkpoint=latest", trainer.step)
            return 0
        if parts.val_loader is not None:
            trainer.evaluate()
        trainer.save()
    finally:
        logs.close()
    final = save_final(parts.model, parts.processor, cfg, accelerator, output_dir, trainer.longest_caption())
    log.info("metrics in %s; TensorBoard: tensorboard --logdir %s", output_dir / METRICS, tc.logging_dir)
    if tc.push_to_hub and accelerator.is_main_process:
        push_to_hub(final, tc.hub_model_id, trainer.step)
    return 0


def main(argv: list[str] | None = None, cfg: RunConfig | None = None) -> int:
    """Exit codes: 0 done (or stopped by a signal after saving), 1 the run failed, 2 bad config or model.
    ``cfg``: the config already built from the command line (``argv`` is then not read)."""
    cfg = cfg or config_or_report(argv)
    if cfg is None:
        return 2
    try:
        accelerator = make_accelerator(cfg)
        with logging_redirect_tqdm(), stop_on_signals() as stop:
            return run(cfg, accelerator, stop)
    except (ConfigError, ModelLoadError) as error:
        log.error("%s", error)
        return 2
    except (TrainingError, StreamError) as error:
        log.error("%s", error)
        return 1
    except Exception:  # a bug: its traceback, then out, so the run's loader workers are shut down, not left waiting
        log.exception("the run failed")
        return 1


if __name__ == "__main__":
    sys.exit(main(cfg=CLI_CONFIG))
