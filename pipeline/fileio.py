"""Atomic file writes and checksums, shared by the packer, the loader, training and inference.

Every output file is written under a temporary name in its own folder, flushed to disk, then renamed
into place (``os.replace`` is atomic within a file system): a reader or a resumed run sees either
the old file or the whole new one, never half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
