"""The output folder of a training run, as one contract: the names of its files, the records in them
(``TrainerState``, ``RunInfo``), which run owns the folder and which checkpoint a start resumes, the
lock, checkpoint rotation, ``previous-runs/``, and what inference reads back (``caption_length``).
Torch-free: ``pipeline.checkpoint`` writes and reads the tensors. The folder, drawn:
docs/training.md, "Run folders, checkpoints and resuming".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from pipeline.config import SECTIONS, ConfigError, compose_files
from shard_tools.fileio import LockBusy, hold_lock, write_json

log = logging.getLogger("train_stream")

CONFIG = "config.yaml"
TRAINER_STATE = "trainer_state.json"
RUN_INFO = "run_info.json"
LOCK = ".lock"
PREVIOUS_RUNS = "previous-runs"  # where overwrite_output_dir and a resume to an older step move files
FINAL = "final"
METRICS = "metrics.jsonl"
EVAL = "eval"
SAMPLE_KEYS = "sample_keys"
MODEL_WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCALER = "scaler.pt"
CAPTION_TOKENS = "caption_tokens_longest"  # TrainerState's key for it, as in the final model's generation config
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# the caption length a trained model was evaluated with: infer_stream.py's default --max-new-tokens
CAPTION_LENGTH_KEY = "trainer_config.generation_max_new_tokens"
ANY_RUN = object()


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def temporary(name: str) -> str:
    """The name ``name`` is written under until it is complete (or removed under): outside the
    checkpoint pattern, so a kill half-way leaves nothing ``latest`` could take."""
    return f".tmp-{name}"


def rng_state_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def loader_state_file(rank: int) -> str:
    return f"loader_state_{rank}.json"


def eval_file(output_dir: Path, step: int) -> Path:
    return output_dir / EVAL / f"step-{step}.json"


# ----------------------------------------------------------------------------------------- records

@dataclasses.dataclass(frozen=True)
class TrainerState:
    """A checkpoint's ``trainer_state.json``."""

    step: int
    world_size: int
    run_id: str | None = None  # None: written before runs had ids (it joins the folder's run)
    # the longest caption trained on so far, over all ranks, in tokens (None: not known); the final
    # model records it (pipeline.model.CAPTION_TOKENS_KEY) as inference's default caption length
    caption_tokens: int | None = None
    caption_recorded: bool = True  # False: written before that record existed (the key is absent); not saved

    @classmethod
    def read(cls, checkpoint: Path) -> TrainerState:
        """Raises ``OSError``, ``ValueError`` (JSON), ``KeyError`` or ``TypeError`` (fields)."""
        data = json.loads((checkpoint / TRAINER_STATE).read_text())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return cls(step=data["step"], world_size=data["world_size"], run_id=data.get("run_id"),
                   caption_tokens=data.get(CAPTION_TOKENS), caption_recorded=CAPTION_TOKENS in data)

    def write(self, checkpoint: Path) -> None:
        write_json(checkpoint / TRAINER_STATE, {"step": self.step, "world_size": self.world_size,
                                                "run_id": self.run_id, CAPTION_TOKENS: self.caption_tokens})

    def caption_problem(self) -> str | None:
        """What is wrong with the recorded longest caption, if anything."""
        value = self.caption_tokens
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return None
        return f"{CAPTION_TOKENS}={value!r}: must be an integer >= 0 or null"


def checkpoint_state(path: Path) -> TrainerState | None:
    """A checkpoint's ``TrainerState``, or None when it cannot be read (a save or a removal that was
    killed half-way, a damaged file)."""
    try:
        return TrainerState.read(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """``run_info.json``: the run that owns the folder and the checkpoint it last started from (another
    folder's, possibly); the file also holds the run's sizes (``details``), which nothing reads back."""

    run_id: str | None = None
    resumed_from: str | None = None

    @classmethod
    def read(cls, output_dir: Path) -> RunInfo:
        path = output_dir / RUN_INFO
        data = json.loads(path.read_text()) if path.is_file() else {}
        return cls(run_id=data.get("run_id"), resumed_from=data.get("resumed_from"))

    def write(self, output_dir: Path, details: dict) -> None:
        write_json(output_dir / RUN_INFO, {"run_id": self.run_id, "resumed_from": self.resumed_from, **details})


# --------------------------------------------------------------------------------- which run owns it

def list_checkpoints(output_dir: Path, run_id: str | None | object = ANY_RUN) -> list[Path]:
    """Complete checkpoints of ``run_id`` (of any run by default; one from before runs had ids counts
    as any run's), oldest first. Temporary folders are ignored; a checkpoint whose trainer_state.json
    cannot be read is left out with a warning rather than stopping every later start."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        match = CHECKPOINT_RE.match(path.name)
        if not match:
            continue
        state = checkpoint_state(path)
        if state is None:
            log.warning("%s has no readable %s (a save or removal that was killed?): ignored", path, TRAINER_STATE)
        elif run_id is ANY_RUN or state.run_id in (run_id, None):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_run_id(path: Path) -> str | None:
    """The run a checkpoint belongs to (None for checkpoints written before runs had ids)."""
    state = checkpoint_state(path)
    return state.run_id if state else None


def folder_run_id(output_dir: Path) -> str | None:
    """The run that owns ``output_dir``: its run_info.json's, else its newest checkpoint's."""
    found = list_checkpoints(output_dir)
    return RunInfo.read(output_dir).run_id or (checkpoint_run_id(found[-1]) if found else None)


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def set_aside(output_dir: Path, names: list[str], label: str) -> Path:
    """Move ``names`` from ``output_dir`` into ``output_dir/previous-runs/LABEL-TIME/``: nothing of a
    run is ever deleted to make room for another."""
    aside = output_dir / PREVIOUS_RUNS / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(output_dir / name, aside / name)
    return aside


@dataclasses.dataclass
class SetAside:
    """Files of ``output_dir`` that ``claim_run`` moves into ``previous-runs/`` once the run has passed
    every start-up check (model, data, checkpoint): a refused run leaves the folder as it was."""

    names: list[str]
    label: str
    warning: str  # followed by where they went

    def apply(self, output_dir: Path) -> None:
        try:
            log.warning("%s %s", self.warning, set_aside(output_dir, self.names, self.label))
        except OSError as error:
            raise ConfigError(f"{output_dir}: cannot prepare the run folder ({error})") from None


@dataclasses.dataclass
class Claim:
    """What a start does in ``output_dir``: the run it continues or begins, the checkpoint it resumes
    (None: from scratch), the files it sets aside once it passed its checks (None: none)."""

    run_id: str
    checkpoint: Path | None = None
    aside: SetAside | None = None


def claim_run(output_dir: Path, tc) -> Claim:
    """The ``Claim`` of a run in ``output_dir``; it moves nothing itself. A fresh run never starts
    among another run's files (``ConfigError`` with the ways out, unless ``overwrite_output_dir`` sets
    them aside); ``latest`` resumes only the folder's own run, and falls back to the checkpoint the
    run last started from (another folder's) before any of its own."""
    owner, spec = folder_run_id(output_dir), tc.resume_from_checkpoint
    if spec == "latest":  # what a preemptible job passes on every start, the first one too
        ours = list_checkpoints(output_dir, owner)
        origin = RunInfo.read(output_dir).resumed_from
        if ours:
            return Claim(owner, ours[-1])
        if origin and checkpoint_state(Path(origin)) is not None:
            return Claim(owner, Path(origin))
        log.info("resume_from_checkpoint=latest: no checkpoint of this folder's run in %s, starting from "
                 "scratch", output_dir)
        return Claim(owner or new_run_id())
    if spec:
        return claim_checkpoint(output_dir, Path(spec), owner, spec)
    if (output_dir / RUN_INFO).is_file() or list_checkpoints(output_dir):
        leftovers = sorted(p.name for p in output_dir.iterdir() if p.name not in (LOCK, PREVIOUS_RUNS))
        if not tc.overwrite_output_dir:
            raise ConfigError(f"{output_dir} holds run {owner}'s files ({', '.join(leftovers[:4])}"
                              f"{', ...' if len(leftovers) > 4 else ''}): continue it with "
                              f"trainer_config.resume_from_checkpoint=latest, or start afresh in a new "
                              f"trainer_config.output_dir or with ++trainer_config.overwrite_output_dir=true "
                              f"(moves them to {output_dir / PREVIOUS_RUNS}/)")
        return Claim(new_run_id(), None, SetAside(leftovers, owner or "unnamed",
                                                  f"overwrite_output_dir: moved run {owner}'s files from {output_dir} to"))
    return Claim(new_run_id())


def claim_checkpoint(output_dir: Path, path: Path, owner: str | None, spec: str) -> Claim:
    """``resume_from_checkpoint=PATH``: resumed into its own run's folder; going back, the run's later
    checkpoints are set aside (an abandoned line: not to be taken for the newest)."""
    state = checkpoint_state(path)
    if state is None:
        raise ConfigError(f"trainer_config.resume_from_checkpoint={spec}: not a checkpoint folder "
                          f"(no readable {TRAINER_STATE}); use 'latest' or a checkpoint-STEP folder")
    run_id = state.run_id or owner or new_run_id()  # one without an id joins this folder's run
    if owner is not None and owner != run_id:
        raise ConfigError(f"{path} belongs to run {run_id}, but {output_dir} holds run {owner}: resume it "
                          f"into its own output_dir, or a new one")
    later = [p.name for p in list_checkpoints(output_dir, run_id) if checkpoint_state(p).step > state.step]
    aside = None
    if later:
        aside = SetAside(later, f"{run_id}-after-step-{state.step}", f"resuming at step {state.step}: "
                         f"this run's later checkpoints ({', '.join(later)}) were moved to")
    return Claim(run_id, path, aside)


def open_run(output_dir: Path, tc, lock: contextlib.ExitStack) -> Claim:
    """The main process's start: ``output_dir`` locked until ``lock`` closes (a second run would
    interleave its checkpoints and logs with the first's), then ``claim_run``; every refusal is one
    ``ConfigError`` line."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.enter_context(hold_lock(output_dir / LOCK))
        return claim_run(output_dir, tc)
    except LockBusy as error:
        raise ConfigError(f"{output_dir} is in use by another training run ({error}): wait for it to end, "
                          f"or set another trainer_config.output_dir") from None
    except OSError as error:
        raise ConfigError(f"{output_dir}: cannot prepare the run folder ({error})") from None


def rotate_checkpoints(output_dir: Path, keep: int | None, run_id: str, saved: Path) -> None:
    """Keep the newest ``keep`` checkpoints of this run, ``saved`` (the one just written) always
    among them; never touch another run's. A folder is renamed out of the checkpoint pattern before
    it is deleted, so a kill half-way leaves no half checkpoint for ``latest`` to find."""
    if not keep or keep < 1:
        return
    others = [p for p in list_checkpoints(output_dir, run_id) if p != saved]
    for old in others[:max(0, len(others) - (keep - 1))]:
        doomed = old.with_name(temporary(f"removed-{old.name}"))
        os.replace(old, doomed)
        shutil.rmtree(doomed)
        log.info("removed %s (save_total_limit=%d)", old, keep)


# ------------------------------------------------------------------------ what inference reads back

def caption_length_default() -> int:
    """``CAPTION_LENGTH_KEY``'s default."""
    section, name = CAPTION_LENGTH_KEY.split(".")
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name].default


def caption_length(model_dir: str | os.PathLike) -> tuple[int, str]:
    """``(tokens, where from)``: ``CAPTION_LENGTH_KEY`` of the ``config.yaml`` that train_stream.py
    saves beside a model it trained, else the key's default (the built-in model, a Hub id)."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        return caption_length_default(), f"the default {CAPTION_LENGTH_KEY}"
    section, name = CAPTION_LENGTH_KEY.split(".")
    value = (compose_files(path).get(section) or {}).get(name, caption_length_default())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: {CAPTION_LENGTH_KEY}={value!r}: must be an integer >= 1")
    return value, f"{CAPTION_LENGTH_KEY} of {path}"
