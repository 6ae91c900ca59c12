"""infer_stream.py's output files: the rows (per-rank part files merged into one JSONL) and the
settings recorded beside them (``OUTPUT.settings.json``, ``RunSettings``), which ``--resume`` must
match (``resume_problem``). docs/inference.md, "Resume".
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
from pathlib import Path

from shard_tools.fileio import write_atomic, write_json
from pipeline.model import BUILTIN_TINY


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What decides the captions."""

    model: str  # the built-in name, a Hub id, or a checkpoint folder's resolved path
    prefix: str
    max_new_tokens: int
    num_beams: int
    decoder: str
    dtype: str
    audio_window: str = "full"  # records from before encoder windows were all full


@dataclasses.dataclass(frozen=True)
class Record:
    """``OUTPUT.settings.json``: the settings, and whether ``OUTPUT`` holds rows made with them."""

    settings: RunSettings
    output_rows: bool


def model_identity(name: str) -> str:
    """``name`` as recorded: a local folder by its resolved path (the same folder named two ways agrees)."""
    return os.path.realpath(name) if name != BUILTIN_TINY and os.path.isdir(name) else name


def settings_file(output: Path) -> Path:
    return Path(f"{output}.settings.json")


def read_record(output: Path) -> Record | None:
    """The record beside ``output``, None if there is none; ``ValueError``, ``TypeError`` or
    ``KeyError`` for one that is not a record."""
    path = settings_file(output)
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data["output_rows"], bool):
        raise ValueError(f"output_rows={data['output_rows']!r}")
    return Record(RunSettings(**data["settings"]), data["output_rows"])


def write_record(output: Path, settings: RunSettings, output_rows: bool) -> None:
    write_json(settings_file(output), dataclasses.asdict(Record(settings, output_rows)))


def resume_problem(output: Path, settings: RunSettings) -> str:
    """Why ``--resume`` cannot continue the rows of ``output`` with ``settings`` (one line), or ""."""
    way_out = "run without --resume to replace them, or pick another --output"
    try:
        record = read_record(output)
    except (OSError, ValueError, TypeError, KeyError) as error:
        return f"--resume: cannot read {settings_file(output)} ({error!r}); {way_out}"
    if record is None:
        if output.exists() or part_files(output):
            return (f"--resume: {output} has no record of the settings its rows were made with "
                    f"({settings_file(output)}); {way_out}")
        return ""
    differ = [f"{name} {value!r} (now {getattr(settings, name)!r})"
              for name, value in dataclasses.asdict(record.settings).items() if getattr(settings, name) != value]
    return f"--resume: the rows of {output} were made with other settings: {', '.join(differ)}; {way_out}" \
        if differ else ""


def part_files(output: Path) -> list[str]:
    return sorted(glob.glob(glob.escape(str(output)) + ".part-*"))


def open_part(output: Path, rank: int):
    """This rank's part file for appending. A killed run may have left half a line at its end: start
    on a fresh line so that fragment stays a line of its own (ignored, its clip captioned again)."""
    path = Path(f"{output}.part-{rank:05d}")
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            ends_cleanly = f.read(1) == b"\n"
        if not ends_cleanly:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return open(path, "a", encoding="utf-8")


def resumable_rows(output: Path) -> bool:
    """Whether ``output`` holds rows made with the recorded settings (not those of a run before an
    interrupted fresh one)."""
    return output.exists() and read_record(output).output_rows


def read_rows(path: str | Path):
    """The JSON rows of a JSONL file; a line that is not a row (a write cut off by a kill) is
    reported and ignored, so its clip counts as not done."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                print(f"warning: {path}:{number} is not a JSON row ({error}; an interrupted write?): ignored",
                      file=sys.stderr)
                continue
            if not isinstance(row, dict) or "key" not in row:
                print(f"warning: {path}:{number} has no 'key': ignored", file=sys.stderr)
                continue
            yield row


def rows_text(rows: list[dict]) -> str:
    """The JSONL text of ``rows``, one row a line."""
    return "".join(json.dumps(row) + "\n" for row in rows)


def merge_outputs(output: Path, settings: RunSettings, resume: bool) -> list[dict]:
    """Write ``output`` = earlier rows (``--resume``) + this run's part files sorted by key, each key
    once, atomically, and record that it holds rows made with ``settings``; remove the part files.
    Returns the rows."""
    parts = part_files(output)
    old = list(read_rows(output)) if resume and resumable_rows(output) else []
    new = sorted((row for path in parts for row in read_rows(path)), key=lambda row: row["key"])
    rows, seen = [], set()
    for row in old + new:
        if row["key"] not in seen:
            seen.add(row["key"])
            rows.append(row)
    if len(rows) < len(old) + len(new):
        print(f"warning: {len(old) + len(new) - len(rows)} duplicate keys dropped while merging", file=sys.stderr)
    write_atomic(output, rows_text(rows))
    write_record(output, settings, output_rows=True)
    for path in parts:
        os.remove(path)
    return rows
