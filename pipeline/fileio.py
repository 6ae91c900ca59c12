"""Atomic file writes and checksums, shared by the packer, the loader, training and inference.

Every output file is written under a temporary name in its own folder, flushed to disk, then renamed
into place (``os.replace`` is atomic within a file system): a reader or a resumed run sees either
the old file or the whole new one, never half of it. The temporary is created with mode 0666 less
the umask, as ``open`` creates any file (``mkstemp``'s 0600 would hide an index from other users).

``hold_lock`` is an exclusive ``flock`` on a lock file: the kernel releases it when its process dies,
so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from pathlib import Path


class LockBusy(OSError):
    """Another process holds the lock."""


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike):
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block; ``LockBusy``
    at once, naming the file and the holder's pid, if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise LockBusy(f"{path} is locked by process {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message a second process gets
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # leave no temporary behind; the error itself goes on up
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented UTF-8 JSON with a final newline, written atomically."""
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1-MiB blocks (shards can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
