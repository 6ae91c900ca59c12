"""Deterministic, crash-safe output of the packer: tar shards, ``index.json``, ``rejects.jsonl`` and
the progress file that makes an interrupted run resumable (docs/FORMAT.md is the contract). Shards
are written as ``NAME.tmp`` and renamed when complete; how that gives ``--resume`` the same bytes as
an uninterrupted run: docs/packing.md, "Resume".
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from shard_tools.fileio import file_sha256, write_atomic
from shard_tools.shard_format import IndexEntry, Reject, json_line, key_sketch

PROGRESS_FILE = ".progress.jsonl"
TAR_END = 2 * tarfile.BLOCKSIZE  # two zero blocks close an archive


# ----------------------------------------------------------------------------- tar bytes

def member_pieces(name: str, data: bytes) -> tuple[bytes, bytes, bytes]:
    """One tar member as (header, data, zero padding to a whole block), with fixed metadata; written
    piece by piece, so the data (a clip's log-mel) is not copied into a joined block first."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    return header, data, b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def archive_size(content_bytes: int) -> int:
    """Final tar size for ``content_bytes`` of member blocks: end blocks, padded to a whole record
    (20 blocks), as ``tarfile`` and GNU tar write it."""
    return -(-(content_bytes + TAR_END) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def shard_name(index: int) -> str:
    """``000.tar``, ``001.tar``, … (at least three digits, more when needed)."""
    return f"{index:03d}.tar"


# ----------------------------------------------------------------------------- shards

class ShardWriter:
    """Fills ``directory/000.tar, 001.tar, …`` in the order samples arrive.

    A shard is closed after ``samples_per_shard`` samples, or before a sample that would take it past
    ``max_bytes`` (a sample larger than that alone gets a shard of its own). ``on_shard(entry)`` runs
    after each shard is renamed into place; ``entry`` holds the index fields plus ``truncated`` and
    ``next_input``, the position of the first input not in this or an earlier shard.
    """

    def __init__(self, directory: Path, samples_per_shard: int | None, max_bytes: int | None,
                 first_shard: int = 0, on_shard: Callable[[dict], None] | None = None):
        if not samples_per_shard and not max_bytes:
            raise ValueError("a shard needs a sample limit, a size limit or both")
        self.directory = Path(directory)
        self.samples_per_shard = samples_per_shard
        self.max_bytes = max_bytes
        self.next_shard = first_shard
        self.on_shard = on_shard
        self._file = None

    def add(self, key: str, members: list[tuple[str, bytes]], seconds: float, truncated: bool,
            position: int) -> None:
        """Append one sample, the input at ``position``."""
        pieces = [piece for name, data in members for piece in member_pieces(name, data)]
        size = sum(len(piece) for piece in pieces)
        if self._file is not None and self.max_bytes and archive_size(self._size + size) > self.max_bytes:
            self._finish(next_input=position)
        if self._file is None:
            self._open()
        for piece in pieces:
            self._write(piece)
        self._samples += 1
        self._keys.append(key)
        self._seconds += seconds
        self._truncated += int(truncated)
        if self.samples_per_shard and self._samples >= self.samples_per_shard:
            self._finish(next_input=position + 1)

    def close(self, next_input: int) -> None:
        """Complete the open shard, if any; ``next_input`` is the number of inputs consumed."""
        if self._file is not None:
            self._finish(next_input)

    def abort(self) -> None:
        """Drop the shard being written (its ``.tmp``), after an error."""
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._name = shard_name(self.next_shard)
        self._tmp = self.directory / f"{self._name}.tmp"
        self._file = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._size = self._samples = self._truncated = 0
        self._seconds = 0.0
        self._keys: list[str] = []

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._size += len(data)

    def _finish(self, next_input: int) -> None:
        self._write(b"\0" * (archive_size(self._size) - self._size))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.directory / self._name)
        self.next_shard += 1
        entry = {**IndexEntry(self._name, self._samples, round(self._seconds, 6), self._size, self._sha.hexdigest(),
                              key_sketch(self._keys)).to_dict(),
                 "truncated": self._truncated, "next_input": next_input}
        if self.on_shard is not None:
            self.on_shard(entry)


# ----------------------------------------------------------------------------- index, rejects, progress

def write_rejects(path: Path, rejects: Iterable[Reject]) -> None:
    """``rejects.jsonl``: one ``{"path", "reason"}`` line per input that was not packed."""
    write_atomic(path, "".join(r.line() for r in rejects))


def index_entry(shard: dict) -> IndexEntry:
    """The index.json entry of a shard the writer completed (its progress entry holds more; one
    written before key sketches existed has none)."""
    return IndexEntry.from_dict(shard, PROGRESS_FILE)


def intact(directory: Path, entry: dict) -> bool:
    """The shard named by ``entry`` exists with the recorded size and sha256."""
    path = Path(directory) / entry["name"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and file_sha256(path) == entry["sha256"]


def intact_prefix(directory: Path, shards: list[dict]) -> list[dict]:
    """The leading shards that are still intact (a later shard depends on every earlier one)."""
    kept = []
    for entry in shards:
        if not intact(directory, entry):
            break
        kept.append(entry)
    return kept


class ProgressLog:
    """``.progress.jsonl``, appended (and fsynced) after every completed shard, so that saving it
    costs the same for the thousandth shard as for the first. Lines: ``{"settings"}`` first, then
    ``{"shard": entry, "rejects": [...]}`` per shard with the rejects among its inputs, and a final
    ``{"complete": true, "rejects": [...]}``. A line cut short by a kill is ignored when read."""

    def __init__(self, directory: Path, settings: dict, shards: list[dict], rejects: list[dict]):
        """Start the log over with ``settings`` and the kept ``shards`` and their ``rejects``."""
        self.path = Path(directory) / PROGRESS_FILE
        lines, first = [{"settings": settings}], 0
        for shard in shards:  # rejects are in input order: hand each shard those before its end
            last = first
            while last < len(rejects) and rejects[last].input < shard["next_input"]:
                last += 1
            lines.append(_shard_line(shard, rejects[first:last]))
            first = last
        write_atomic(self.path, "".join(json_line(line) for line in lines))

    def add_shard(self, entry: dict, rejects: list[Reject]) -> None:
        self._append(_shard_line(entry, rejects))

    def finish(self, rejects: list[Reject], inputs: dict) -> None:
        """The run completed; ``inputs`` describes the inputs after the last shard (see pack)."""
        self._append({"complete": True, "rejects": [asdict(r) for r in rejects], "inputs": inputs})

    def _append(self, line: dict) -> None:
        with open(self.path, "ab") as f:
            f.write(json_line(line).encode("ascii"))
            f.flush()
            os.fsync(f.fileno())


def _shard_line(entry: dict, rejects: list[Reject]) -> dict:
    return {"shard": entry, "rejects": [asdict(r) for r in rejects]}


def read_progress(directory: Path) -> dict | None:
    """``{"settings", "shards", "rejects", "complete", "tail"}`` from ``.progress.jsonl`` (``tail``:
    the final line's description of the inputs after the last shard), None without one."""
    path = Path(directory) / PROGRESS_FILE
    if not path.is_file():
        return None
    progress = {"settings": None, "shards": [], "rejects": [], "complete": False, "tail": None}
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:  # the last line, cut short by a kill: nothing after it counts
            break
        if "settings" in line:
            progress["settings"] = line["settings"]
        if "shard" in line:
            progress["shards"].append(line["shard"])
        progress["rejects"] += [Reject(**r) for r in line.get("rejects", [])]
        progress["complete"] = bool(line.get("complete"))
        progress["tail"] = line.get("inputs")
    return progress
