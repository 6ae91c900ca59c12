"""The output folder of a training run: which run owns it (``run_info.json``, its checkpoints'
``trainer_state.json``), which checkpoint a start resumes, and another run's files set aside
(``previous-runs/``), never deleted. Used by ``train_stream.py``, which holds the folder's lock."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from pipeline.config import ConfigError

log = logging.getLogger("train_stream")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RUN_INFO = "run_info.json"
PREVIOUS_RUNS = "previous-runs"  # where overwrite_output_dir moves another run's files
ANY_RUN = object()


def checkpoint_state(path: Path) -> dict | None:
    """A checkpoint's trainer_state.json, or None when it cannot be read (a save or a removal that was
    killed half-way, a damaged file)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def checkpoint_run_id(path: Path) -> str | None:
    """The run a checkpoint belongs to (None for checkpoints written before runs had ids)."""
    return (checkpoint_state(path) or {}).get("run_id")


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
            log.warning("%s has no readable trainer_state.json (a save or removal that was killed?): ignored", path)
        elif run_id is ANY_RUN or state.get("run_id") in (run_id, None):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def run_info(output_dir: Path) -> dict:
    path = output_dir / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def folder_run_id(output_dir: Path) -> str | None:
    """The run that owns ``output_dir``: its run_info.json's, else its newest checkpoint's."""
    found = list_checkpoints(output_dir)
    return run_info(output_dir).get("run_id") or (checkpoint_run_id(found[-1]) if found else None)


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


def claim_run(output_dir: Path, tc) -> tuple[str, Path | None, SetAside | None]:
    """``(run id, checkpoint to resume or None, files to set aside or None)`` for a run in
    ``output_dir``; it moves nothing itself (the caller applies the ``SetAside`` once the run passed its
    checks). A fresh run never starts among another run's files (``ConfigError`` with the ways out,
    unless ``overwrite_output_dir`` sets them aside); ``latest`` resumes only the folder's own run, and
    falls back to the checkpoint the run last started from (another folder's) before any of its own."""
    owner, spec = folder_run_id(output_dir), tc.resume_from_checkpoint
    if spec == "latest":  # what a preemptible job passes on every start, the first one too
        ours = list_checkpoints(output_dir, owner)
        origin = run_info(output_dir).get("resumed_from")
        if ours:
            return owner, ours[-1], None
        if origin and checkpoint_state(Path(origin)) is not None:
            return owner, Path(origin), None
        log.info("resume_from_checkpoint=latest: no checkpoint of this folder's run in %s, starting from "
                 "scratch", output_dir)
        return owner or new_run_id(), None, None
    if spec:
        path = Path(spec)
        state = checkpoint_state(path)
        if state is None:
            raise ConfigError(f"trainer_config.resume_from_checkpoint={spec}: not a checkpoint folder "
                              f"(no readable trainer_state.json); use 'latest' or a checkpoint-STEP folder")
        run_id = state.get("run_id") or owner or new_run_id()  # one without an id joins this folder's run
        if owner is not None and owner != run_id:
            raise ConfigError(f"{path} belongs to run {run_id}, but {output_dir} holds run {owner}: resume it "
                              f"into its own output_dir, or a new one")
        later = [p.name for p in list_checkpoints(output_dir, run_id) if checkpoint_state(p)["step"] > state["step"]]
        aside = None
        if later:  # going back: the abandoned line's checkpoints must not be taken for the newest
            aside = SetAside(later, f"{run_id}-after-step-{state['step']}", f"resuming at step {state['step']}: "
                             f"this run's later checkpoints ({', '.join(later)}) were moved to")
        return run_id, path, aside
    if (output_dir / RUN_INFO).is_file() or list_checkpoints(output_dir):
        leftovers = sorted(p.name for p in output_dir.iterdir() if p.name not in (".lock", PREVIOUS_RUNS))
        if not tc.overwrite_output_dir:
            raise ConfigError(f"{output_dir} holds run {owner}'s files ({', '.join(leftovers[:4])}"
                              f"{', ...' if len(leftovers) > 4 else ''}): continue it with "
                              f"trainer_config.resume_from_checkpoint=latest, or start afresh in a new "
                              f"trainer_config.output_dir or with ++trainer_config.overwrite_output_dir=true "
                              f"(moves them to {output_dir / PREVIOUS_RUNS}/)")
        return new_run_id(), None, SetAside(leftovers, owner or "unnamed",
                                            f"overwrite_output_dir: moved run {owner}'s files from {output_dir} to")
    return new_run_id(), None, None


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def rotate_checkpoints(output_dir: Path, keep: int | None, run_id: str, saved: Path) -> None:
    """Keep the newest ``keep`` checkpoints of this run, ``saved`` (the one just written) always
    among them; never touch another run's. A folder is renamed out of the checkpoint pattern before
    it is deleted, so a kill half-way leaves no half checkpoint for ``latest`` to find."""
    if not keep or keep < 1:
        return
    others = [p for p in list_checkpoints(output_dir, run_id) if p != saved]
    for old in others[:max(0, len(others) - (keep - 1))]:
        doomed = old.with_name(f".tmp-removed-{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed)
        log.info("removed %s (save_total_limit=%d)", old, keep)
