"""Atomic file writes and checksums, shared by the packer, the loader, training and inference.

A file is written under a temporary name beside it and renamed into place, replacing only a regular
file or a new path (``check_replaceable``); ``hold_lock`` is a ``flock`` the kernel drops when its
process dies. Why: docs/FORMAT.md, "Layout on disk".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path


class LockBusy(OSError):
    """Another process holds the lock."""


class NotRegularFile(OSError):
    """A path to be written is there but is not a regular file (a symbolic link, a device, a pipe, a folder)."""


def file_type(mode: int) -> str:
    """What an ``st_mode`` that is not a regular file's names, for messages ("a FIFO", "a symbolic link")."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def check_replaceable(path: str | os.PathLike) -> None:
    """``NotRegularFile`` naming ``path`` unless it is a regular file (not a link to one) or absent."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{path} is {file_type(mode)}: only a regular file or a new path is written")


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike):
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block; ``LockBusy``
    at once, naming the file and the holder's pid, if another process holds it; ``NotRegularFile``
    if ``path`` is a symbolic link or anything but a regular file (the pid written would land in it)."""
    check_replaceable(path)
    # O_NOFOLLOW: a link put there since the check fails (ELOOP) instead of being followed
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # a pipe or device put there since the check
            raise NotRegularFile(f"{path} is {file_type(mode)}: only a regular file or a new path is written")
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
    """Write ``data`` (text is UTF-8) to ``path`` atomically; ``NotRegularFile`` (nothing written)
    if ``path`` is there but not a regular file."""
    path = Path(path)
    check_replaceable(path)
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
