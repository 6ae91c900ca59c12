"""What every rank of a training run writes into and reads from its run folder (``pipeline.runs``, the
folder's contract): the start (the main process's claim, sent to all ranks), checkpoints and
``final/``. Checkpoints are written by our own code (safetensors model, optimizer, RNG per rank, the
loader's stream position per rank, ``TrainerState``, config) into a temporary folder that is renamed
when complete; they assume a file system shared by all ranks (one node, or a shared mount across
nodes), and are read back with ``torch.load(weights_only=True)``: nothing is unpickled."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import SafetensorError

from pipeline.config import ConfigError, RunConfig, save_config
from pipeline.model import save_model
from pipeline.runs import (CAPTION_LENGTH_KEY, CONFIG, FINAL, MODEL_WEIGHTS, OPTIMIZER, SCALER, TRAINER_STATE, Claim,
                           TrainerState, checkpoint_name, checkpoint_run_id, loader_state_file, open_run,
                           rng_state_file, rotate_checkpoints, set_aside, temporary)
from pipeline.train_logs import TrainingError, write_error
from shard_tools.fileio import write_json

log = logging.getLogger("train_stream")


def start_run(output_dir: Path, tc, accelerator: Accelerator, lock: contextlib.ExitStack) -> Claim:
    """The run's ``Claim``, decided by the main process, which locks ``output_dir`` until ``lock``
    closes (``pipeline.runs.open_run``), and sent to every rank, so all ranks raise the same error or
    go on together; the files to set aside are the main process's to move (None on the others)."""
    claim, decision = None, [None]
    if accelerator.is_main_process:
        try:
            claim = open_run(output_dir, tc, lock)
            decision = [("ok", claim.run_id, str(claim.checkpoint) if claim.checkpoint else None)]
        except ConfigError as error:  # sent on, so the other ranks stop too instead of waiting forever
            decision = [("error", str(error), None)]
    decision = broadcast_object_list(decision) if accelerator.num_processes > 1 else decision
    status, value, checkpoint = decision[0]
    if status == "error":
        raise ConfigError(value)
    return claim or Claim(value, Path(checkpoint) if checkpoint else None)


def rng_state() -> dict:
    """This process's random generators, as tensors and numbers (``torch.load(weights_only=True)`` safe)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy": [int(pos), int(has_gauss), float(cached)], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def write_failure(action) -> str | None:
    """``action()``; why a write in it failed (an ``OSError``, or safetensors' for one), else None."""
    try:
        action()
    except (OSError, SafetensorError) as error:
        return getattr(error, "strerror", None) or str(error)
    return None


def save_tensors(obj, path: Path) -> None:
    """``torch.save`` through a Python file, so that a failed write raises its ``OSError`` (torch's own
    file writer, and its zip writer after a Python write, raise a RuntimeError without the cause)."""
    with open(path, "wb") as file:
        try:
            torch.save(obj, file)
        except RuntimeError as error:
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None
            raise


def save_checkpoint(output_dir: Path, state: TrainerState, model, optimizer, loader, accelerator: Accelerator,
                    cfg: RunConfig) -> Path:
    """``output_dir/checkpoint-STEP``: written into a temporary folder by all ranks, then renamed; an
    earlier checkpoint of that name is replaced if it is this run's, set aside if another run's."""
    name = checkpoint_name(state.step)
    final, tmp = output_dir / name, output_dir / temporary(name)
    rank = accelerator.process_index

    def shared_part() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed
        tmp.mkdir(parents=True)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        safetensors.torch.save_model(unwrapped, str(tmp / MODEL_WEIGHTS))
        save_tensors(optimizer.state_dict(), tmp / OPTIMIZER)
        if accelerator.scaler is not None:
            save_tensors(accelerator.scaler.state_dict(), tmp / SCALER)
        state.write(tmp)
        save_config(cfg, tmp / CONFIG)

    def rank_part() -> None:
        save_tensors(rng_state(), tmp / rng_state_file(rank))
        write_json(tmp / loader_state_file(rank), loader.state_dict())

    failed = write_failure(shared_part) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    failed = failed or write_failure(rank_part)
    # every rank learns of any rank's failure, so all stop together (the main process's, if any, first)
    failed = next(filter(None, gather_object([failed]) if accelerator.num_processes > 1 else [failed]), None)
    if failed:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # the partial checkpoint would hold the full disk's space
        raise write_error(output_dir, name, failed)
    if accelerator.is_main_process:
        other = checkpoint_run_id(final) if final.exists() else state.run_id
        if other not in (state.run_id, None):
            log.warning("%s belongs to run %s: moved to %s", final, other, set_aside(output_dir, [final.name], other))
        elif final.exists():
            shutil.rmtree(final)  # this run's own, from before a resume, or unreadable
        os.replace(tmp, final)
        rotate_checkpoints(output_dir, cfg.trainer_config.save_total_limit, state.run_id, final)
        log.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def checkpoint_part(file: Path, load):
    """``load(file)``; whatever a damaged or missing file makes the reader raise is reported as a
    ``TrainingError`` naming the file (the readers raise many types: OSError, JSON, safetensors,
    torch unpickling errors)."""
    try:
        return load(file)
    except Exception as error:
        raise TrainingError(f"checkpoint file {file} cannot be loaded ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}); resume from another "
                            f"checkpoint") from error


def load_checkpoint(path: Path, model, optimizer, loader, accelerator: Accelerator) -> TrainerState:
    """Restore model, optimizer, scaler, RNG and stream position; returns the checkpoint's state, its
    ``caption_tokens`` None where not known (a checkpoint older than that record). On another
    number of processes the stream re-plans the rest of the epoch (docs/streaming.md, elastic
    resume); a rank the checkpoint has no RNG state for keeps its freshly seeded generators. A file
    that cannot be read is a ``TrainingError`` naming it and the problem."""
    state = checkpoint_part(path / TRAINER_STATE, lambda f: TrainerState.read(f.parent))
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # read onto the CPU, copied into the parameters wherever they live ("cpu:0", the name accelerate
    # gives the CPU in multi-process runs, is not a device safetensors accepts)
    checkpoint_part(path / MODEL_WEIGHTS, lambda f: safetensors.torch.load_model(unwrapped, f, device="cpu"))
    optimizer.load_state_dict(checkpoint_part(path / OPTIMIZER,
                                              lambda f: torch.load(f, map_location="cpu", weights_only=True)))
    if accelerator.scaler is not None and (path / SCALER).is_file():
        accelerator.scaler.load_state_dict(checkpoint_part(path / SCALER, lambda f: torch.load(f, weights_only=True)))
    rank = accelerator.process_index
    rng = path / rng_state_file(rank)
    if rng.is_file():
        set_rng_state(checkpoint_part(rng, lambda f: torch.load(f, weights_only=True)))
    own = path / loader_state_file(rank)
    loader.load_state_dict(checkpoint_part(own if own.is_file() else path / loader_state_file(0),
                                           lambda f: json.loads(f.read_text())))
    log.info("resumed from %s at step %d%s", path, state.step,
             f" (saved by {state.world_size} processes, now {accelerator.num_processes})"
             if state.world_size != accelerator.num_processes else "")
    if not state.caption_recorded:
        log.warning("%s predates the record of the longest training caption: the final model will record none, "
                    "and inference will default to %s", path, CAPTION_LENGTH_KEY)
    elif problem := state.caption_problem():
        raise TrainingError(f"{path / TRAINER_STATE}: {problem}; resume from another checkpoint")
    return state


def save_final(model, processor, cfg: RunConfig, accelerator: Accelerator, output_dir: Path,
               caption_tokens: int | None) -> Path:
    """``output_dir/final``: ``save_pretrained`` model (LoRA adapters merged into a copy: a plain
    Whisper folder), tokenizer and feature extractor, the caption prefixes and ``caption_tokens``
    (the longest caption trained on, over all ranks) and the encoder window, plus the config."""
    final, tmp = output_dir / FINAL, output_dir / temporary(FINAL)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        if cfg.model_config.lora_r:
            unwrapped = copy.deepcopy(unwrapped).merge_and_unload()
        save_model(unwrapped, processor, tmp, prefixes=cfg.data_config.prefixes(), caption_tokens=caption_tokens,
                   window=cfg.model_config.window())
        save_config(cfg, tmp / CONFIG)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        log.info("final model saved to %s", final)
    accelerator.wait_for_everyone()
    return final
