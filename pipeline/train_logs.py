"""The training run's logs in its output folder, on a disk that may fill: TensorBoard's event file,
``metrics.jsonl`` and the progress bar (``MetricsLog``), the per-step sample keys (``SampleKeysLog``).
A failed write is one ``TrainingError`` line naming the file (``write_error``)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from pipeline.runs import METRICS, SAMPLE_KEYS
from shard_tools.fileio import write_atomic

log = logging.getLogger("train_stream")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. NaN losses in a row); the message says why and what to try."""


def write_error(path, what: str, reason: str, hint: str = "") -> TrainingError:
    """The one line for a write that failed (a full disk): the run stops, its last checkpoint resumes it."""
    return TrainingError(f"{path}: cannot write {what} ({reason}): free some space{hint} and continue with "
                         f"trainer_config.resume_from_checkpoint=latest")



class MetricsLog:
    """TensorBoard (tensorboardX's event file, written in this thread: a failed write, a full disk, is
    one line, not a writer thread's and an atexit traceback), ``metrics.jsonl`` and the tqdm bar, on
    the main process only."""

    def __init__(self, output_dir: Path, logging_dir: Path, accelerator: Accelerator, max_steps: int,
                 start_step: int):
        self.main, self.files = accelerator.is_main_process, {}  # path: open file
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", disable=not self.main, dynamic_ncols=True)
        if self.main:
            from tensorboardX.event_file_writer import EventsWriter

            self.attempt(lambda: logging_dir.mkdir(parents=True, exist_ok=True), logging_dir)
            self.files[logging_dir] = self.attempt(lambda: EventsWriter(str(logging_dir / "events")), logging_dir)
            jsonl = output_dir / METRICS
            self.files[jsonl] = self.attempt(lambda: open(jsonl, "a"), jsonl)

    def attempt(self, action, path: Path):
        """``action()``; an ``OSError`` is one ``TrainingError`` line naming ``path``, the files closed."""
        try:
            return action()
        except OSError as error:
            files, self.files = self.files, {}
            for file in files.values():  # their unwritten data is lost with the error: closing retries the flush
                with contextlib.suppress(OSError):
                    file.close()
            raise write_error(path, "the metrics", error.strerror or str(error)) from None

    def log_metrics(self, step: int, metrics: dict, prefix: str) -> None:
        if not self.main:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        (events_path, events), (jsonl_path, jsonl) = self.files.items()
        for name, value in metrics.items():
            event = Event(wall_time=time.time(), step=step, summary=scalar(f"{prefix}/{name}", value))
            self.attempt(lambda: events.write_event(event), events_path)
        self.attempt(events.flush, events_path)
        self.attempt(lambda: jsonl.write(json.dumps({"step": step, "prefix": prefix, **metrics}) + "\n"), jsonl_path)
        self.attempt(jsonl.flush, jsonl_path)
        if prefix == "train":
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 wait=f"{metrics['data_wait']:.0%}", refresh=False)
        else:
            log.info("%s step %d: %s", prefix, step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def close(self) -> None:
        self.bar.close()
        while self.files:
            path, file = self.files.popitem()
            self.attempt(file.close, path)


class SampleKeysLog:
    """``output_dir/sample_keys/rank-R.jsonl`` with ``log_sample_keys``: one line per optimizer step,
    ``{"step", "epoch", "keys"}``, the real keys of that step's micro-batches on this rank (a step
    dropped for a NaN loss: the same with ``"skipped": true``), to prove what the model saw or find the
    batch behind a loss spike. On every start, lines past the resumed step (the interrupted run's
    steps after its last checkpoint, done again now) are removed first, so each step appears once."""

    def __init__(self, output_dir: Path, accelerator: Accelerator, start_step: int, enabled: bool):
        folder, self.file = output_dir / SAMPLE_KEYS, None
        self.path = folder / f"rank-{accelerator.process_index}.jsonl"
        if accelerator.is_main_process and folder.is_dir():
            for path in folder.glob("rank-*.jsonl"):
                kept = [line for line in path.read_text().splitlines(keepends=True)
                        if line.endswith("\n") and json.loads(line)["step"] <= start_step]  # a torn last line goes
                self.attempt(lambda: write_atomic(path, "".join(kept)), path)
        accelerator.wait_for_everyone()
        if enabled:
            self.attempt(lambda: folder.mkdir(parents=True, exist_ok=True))
            self.file = self.attempt(lambda: open(self.path, "a"))

    def attempt(self, action, path: Path | None = None):
        """``action()``; an ``OSError`` (a full disk) is one ``TrainingError`` line naming the file. The run
        stops without a checkpoint: its disk is the one that is full; a resume from the last one trims this
        log to it."""
        try:
            return action()
        except OSError as error:
            if self.file is not None:  # its unwritten line is lost with the error: closing retries the flush
                file, self.file = self.file, None
                with contextlib.suppress(OSError):
                    file.close()
            raise write_error(path or self.path, "the sample keys log", error.strerror or str(error),
                              " (or set trainer_config.log_sample_keys=false)") from None

    def write(self, step: int, epoch: int, keys: list[str], skipped: bool = False) -> None:
        if self.file is not None:
            row = {"step": step, "epoch": epoch, "keys": keys, **({"skipped": True} if skipped else {})}
            self.attempt(lambda: (self.file.write(json.dumps(row) + "\n"), self.file.flush()))

    def close(self) -> None:
        if self.file is not None:
            self.attempt(self.file.close)
