"""The streaming tar reader the packer (raw-audio shards) and the loader share.

It is our own rather than ``tarfile``'s stream mode: it can *seek* over the data of samples it is told
to skip (resume and worker ranges start mid-shard without reading, let alone decoding, what comes
before), and it reports truncation with the URL and the key it happened in. Samples are dicts keyed by
``__key__`` with one ``bytes`` value per member extension, like webdataset's ``tariterators``. It
reads a stream already open; ``shard_tools.urls`` opens URLs.
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import BinaryIO, Iterator

BLOCK = 512  # tar block size

# webdataset's split of a member name into key and extension: the extension starts at the first dot
# of the base name, the key keeps any directory prefix.
MEMBER_RE = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$")


class ShardReadError(OSError):
    """A shard that cannot be opened or read to the end: ``url``, ``key`` (last key seen) and why."""

    def __init__(self, message: str):
        super().__init__(message)



def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _guarded(method):
    """Turn whatever a backend raises mid-read (http.client.IncompleteRead, socket timeouts, fsspec
    and pipe errors) into ``ShardReadError`` naming the URL and the sample being read."""

    def wrapper(self, *args):
        try:
            return method(self, *args)
        except ShardReadError:
            raise
        except Exception as error:
            key = args[-1]
            where = f" in sample '{key}'" if key else ""
            raise ShardReadError(f"{self.url}: read failed{where} ({type(error).__name__}: {error})") from error

    return wrapper


def _seekable(stream: BinaryIO) -> bool:
    try:
        return stream.seekable()
    except (AttributeError, OSError, ValueError):
        return False


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (records are ``"LEN key=value\\n"``)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError(f"pax record length {length}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


class _TarReader:
    """Tar members one at a time: ``next_header()`` then ``read_data()`` or ``skip_data()``."""

    def __init__(self, stream: BinaryIO, url: str):
        self.stream, self.url = stream, url
        self.seekable = _seekable(stream)

    def _fail(self, reason: str, key: str | None):
        where = f" in sample '{key}'" if key else ""
        raise ShardReadError(f"{self.url}: {reason}{where}")

    @_guarded
    def next_header(self, key: str | None) -> tuple[str, int] | None:
        """``(name, size)`` of the next file member, or None at the end of the archive."""
        long_name = None
        while True:
            block = _read_exact(self.stream, BLOCK)
            if not block or block == bytes(BLOCK):
                return None  # end of archive (end blocks, or data ending on a member boundary)
            if len(block) < BLOCK:
                self._fail("truncated tar (partial header)", key)
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as error:
                self._fail(f"corrupt tar header ({error})", key)
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
                data = self.read_data(info.size, key)
                long_name = (data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                             if info.type == tarfile.GNUTYPE_LONGNAME else _pax_path(data) or long_name)
                continue
            if info.type not in tarfile.REGULAR_TYPES:
                self.skip_data(info.size, key)  # directories, links, pax globals: not sample members
                long_name = None
                continue
            return (long_name or info.name), info.size

    @_guarded
    def read_data(self, size: int, key: str | None) -> bytes:
        padded = -(-size // BLOCK) * BLOCK
        data = _read_exact(self.stream, padded)
        if len(data) < size:
            self._fail(f"truncated tar (member data has {len(data)} of {size} bytes)", key)
        return data[:size]

    @_guarded
    def skip_data(self, size: int, key: str | None) -> None:
        padded = -(-size // BLOCK) * BLOCK
        if self.seekable:
            self.stream.seek(padded, io.SEEK_CUR)  # past EOF is caught by the planned sample count
        elif len(_read_exact(self.stream, padded)) < size:
            self._fail("truncated tar (member data cut short)", key)


def iter_samples(stream: BinaryIO, url: str, skip: int = 0, limit: int | None = None) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", "__index__", ext: bytes, ...}`` of a tar stream, grouping
    consecutive members with the same key. The first ``skip`` samples are passed over without
    reading their data (seeked over where the stream allows); at most ``limit`` are yielded.

    A read error raises ``ShardReadError`` after yielding the sample whose members were read
    before it (the decoder then finds it whole or reports the missing member)."""
    reader = _TarReader(stream, url)
    current, index = None, -1
    stop = None if limit is None else skip + limit
    try:
        while True:
            head = reader.next_header(current and current["__key__"])
            if head is None:
                break
            name, size = head
            match = MEMBER_RE.match(name)
            if not match:
                reader.skip_data(size, name)
                continue
            key, ext = match.groups()
            if current is None or key != current["__key__"]:
                if current is not None and index >= skip:
                    yield current
                index += 1
                if stop is not None and index >= stop:
                    current = None
                    break
                current = {"__key__": key, "__url__": url, "__index__": index}
            if index < skip:
                reader.skip_data(size, key)
            else:
                current[ext] = reader.read_data(size, key)
    except ShardReadError:
        if current is not None and index >= skip:
            yield current  # the members read before the error may still form a whole sample
        raise
    if current is not None and index >= skip:
        yield current


def scan_keys(stream: BinaryIO, url: str) -> list[str]:
    """The keys of a shard's samples (key groups), in order, reading headers only (data is seeked over)."""
    keys: list[str] = []
    reader = _TarReader(stream, url)
    last = None
    while (head := reader.next_header(last)) is not None:
        name, size = head
        reader.skip_data(size, last)
        match = MEMBER_RE.match(name)
        if match and match.group(1) != last:
            last = match.group(1)
            keys.append(last)
    return keys
