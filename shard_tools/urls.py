"""Shard URLs: expansion, index.json lookup, opening, and streaming tar reading.

Why each piece is here:

* ``expand_urls`` turns what a user types (``data/{000..099}.tar``, ``data/<000..099>.tar``, comma
  lists, globs, a split folder or its ``index.json``) into a flat list of shard URLs. The ``<a..b>``
  form exists because braces are awkward in YAML and shells.
* ``resolve_shards`` attaches per-shard sample counts. Exact counts are what lets every rank get the
  same number of batches, so they come from the ``index.json`` beside the shards (written last by
  the packer); only shards that no index lists are counted by a header scan, with a warning.
* ``open_url`` opens local files, ``http(s)://`` (urllib, streamed, never downloaded whole),
  ``pipe:CMD`` (the command's stdout, as in webdataset) and any other ``proto://`` through fsspec.
  http(s) and fsspec reads retry transient faults and resume at the byte reached (``shard_tools.retry``).
* ``iter_samples`` is a small tar reader of our own rather than ``tarfile``'s stream mode: it can
  *seek* over the data of samples it is told to skip (resume and worker ranges start mid-shard
  without reading, let alone decoding, what comes before), and it reports truncation with the URL
  and the key it happened in. Samples are dicts keyed by ``__key__`` with one ``bytes`` value per
  member extension, like webdataset's ``tariterators``.
"""

from __future__ import annotations

import glob
import io
import os
import posixpath
import re
import subprocess
import tarfile
import tempfile
import urllib.error
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from shard_tools.retry import RetryPolicy, open_fsspec, open_http
from shard_tools.shard_format import INDEX_FILE, IndexEntry, key_sketch, parse_index
BLOCK = 512  # tar block size

# webdataset's split of a member name into key and extension: the extension starts at the first dot
# of the base name, the key keeps any directory prefix.
MEMBER_RE = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$")
RANGE_RE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class ShardReadError(OSError):
    """A shard that cannot be opened or read to the end: ``url``, ``key`` (last key seen) and why."""

    def __init__(self, message: str):
        super().__init__(message)


@dataclass(frozen=True)
class Shard:
    """One shard URL with its sample count (from index.json or a header scan), checksum and key
    sketch (``shard_format.key_sketch``; None where its index has none)."""

    url: str
    samples: int
    sha256: str | None = None
    bytes: int | None = None
    key_sketch: tuple[int, ...] | None = None


# ---------------------------------------------------------------------------------------- expansion


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``{}`` or ``<>``."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "{<":
            depth += 1
        elif char in "}>":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _range_items(body: str) -> list[str] | None:
    """``000..099`` -> zero-padded numbers (width of the first bound), or None if not a range."""
    match = RANGE_RE.match(body.strip())
    if not match:
        return None
    lo, hi = match.groups()
    step = 1 if int(hi) >= int(lo) else -1
    width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
    return [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]


def expand_braces(text: str) -> list[str]:
    """Expand ``{a..b}``, ``{x,y}`` and ``<a..b>`` (ranges only) left to right, bash style."""
    match = re.search(r"\{([^{}]*)\}|<([^<>]*)>", text)
    if not match:
        return [text]
    head, tail = text[:match.start()], text[match.end():]
    if match.group(1) is not None:
        body = match.group(1)
        items = _range_items(body)
        if items is None:
            items = body.split(",") if "," in body else None
        if items is None:  # not an expansion (e.g. a literal brace): keep it
            return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    else:
        items = _range_items(match.group(2))
        if items is None:
            raise ValueError(f"'<{match.group(2)}>' in '{text}' is not a range like <000..099>")
    return [head + item + t for item in items for t in expand_braces(tail)]


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def local_path(url: str) -> str | None:
    """The file path of a local shard URL (plain path or ``file://``), None for remote ones."""
    return None if _is_remote(url) else _local_path(url)


def _parent(url: str) -> str | None:
    """The folder URL holding ``url`` (None for ``pipe:``)."""
    if url.startswith("pipe:"):
        return None
    if not _is_remote(url):
        return os.path.dirname(os.path.abspath(_local_path(url)))
    return url.rsplit("/", 1)[0]


def _join(folder: str, name: str) -> str:
    if _is_remote(folder):
        return folder.rstrip("/") + "/" + name
    return os.path.join(folder, name)


def _from_index(index_url: str, policy: RetryPolicy | None) -> list[str]:
    index = read_index(index_url, policy)
    if index is None:
        raise FileNotFoundError(f"{index_url}: no index.json there")
    folder = _parent(index_url)
    return [_join(folder, entry.name) for entry in index[0]]


def _resolve_one(url: str, policy: RetryPolicy | None) -> list[str]:
    """One brace-expanded item -> shard URLs (folder, index.json, glob or a plain URL)."""
    if url.startswith("pipe:"):
        return [url]
    if url.endswith(INDEX_FILE):
        return _from_index(url, policy)
    if _is_remote(url):
        if url.endswith("/"):
            return _from_index(url + INDEX_FILE, policy)
        if glob.has_magic(url.split("://", 1)[1]):
            return _remote_glob(url)
        return [url]
    path = _local_path(url)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, INDEX_FILE)):
            return _from_index(os.path.join(path, INDEX_FILE), policy)
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
        if not found:
            raise FileNotFoundError(f"{path}: folder holds neither index.json nor *.tar shards")
        return found
    if glob.has_magic(path):
        found = sorted(glob.glob(path))
        if not found:
            raise FileNotFoundError(f"{path}: no file matches this pattern")
        return found
    return [path]


def _remote_glob(url: str) -> list[str]:
    fsspec = _import_fsspec(url)
    fs, _, paths = fsspec.core.get_fs_token_paths(url)
    protocol = url.split("://", 1)[0]
    found = sorted(p if "://" in p else f"{protocol}://{p}" for p in paths)
    if not found:
        raise FileNotFoundError(f"{url}: no object matches this pattern")
    return found


def expand_urls(spec, policy: RetryPolicy | None = None) -> list[str]:
    """Shard URLs for ``spec``: a string or path (brace ranges ``{000..099}`` / ``<000..099>``,
    ``{a,b}`` lists, comma-separated items, globs, a split folder or its ``index.json``) or a list
    of such. Order is kept (globs and folders sorted); duplicates raise, as a shard read twice per
    epoch breaks exactly-once."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        for part in _split_top_level(os.fspath(item)):
            for expanded in expand_braces(part):
                urls.extend(_resolve_one(expanded, policy))
    if not urls:
        raise ValueError(f"no shard URLs in {spec!r}")
    first: dict[str, str] = {}  # canonical -> the spelling seen first
    duplicates = []
    for url in urls:
        canonical = canonical_url(url)
        if canonical in first:
            duplicates.append(url if first[canonical] == url else f"{url} (= {first[canonical]})")
        else:
            first[canonical] = url
    if duplicates:
        raise ValueError(f"shard URLs listed more than once: {', '.join(duplicates[:5])}")
    return urls


def canonical_url(url: str) -> str:
    """One spelling per shard (``a/./000.tar``, ``a//000.tar`` and a folder's index entry are one
    file), so that de-duplication sees through spellings; ``pipe:`` commands are taken as written."""
    if url.startswith("pipe:"):
        return url
    if not _is_remote(url):
        return os.path.realpath(_local_path(url))
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme}://{host}/{posixpath.normpath('/' + path).lstrip('/')}"


# ------------------------------------------------------------------------------------------ index


def read_index(index_url: str, policy: RetryPolicy | None = None) -> tuple[list[IndexEntry], int | None] | None:
    """``(entries, n_mels)`` of an ``index.json`` (local, http, fsspec); None when there is none
    (a missing file, HTTP 404). Anything else raises: a server error or a broken index taken for
    "no index" would silently change epoch sizes, and an entry naming a file outside the index's
    folder (absolute, or through ``..``) would have a downloaded index read any file of this machine."""
    try:
        with open_url(index_url, policy) as stream:
            data = stream.read()
    except ShardReadError as error:
        cause = error.__cause__
        if isinstance(cause, FileNotFoundError) or (isinstance(cause, urllib.error.HTTPError) and cause.code == 404):
            return None
        raise
    entries, n_mels = parse_index(data, index_url)
    for entry in entries:
        if posixpath.isabs(entry.name) or ".." in re.split(r"[/\\]", entry.name):
            raise ValueError(f"{index_url}: shard entry {entry.name!r} is not inside the index's folder "
                             f"(names are relative to it, without '..')")
    return entries, n_mels


def resolve_shards(urls: list[str], progress: bool = True, policy: RetryPolicy | None = None
                   ) -> tuple[list[Shard], dict]:
    """Shards with sample counts: from the ``index.json`` beside each shard where one lists it,
    else by a header scan (warned: it reads every such shard once). Returns ``(shards, info)`` with
    ``info = {"n_mels": int | None, "scanned": [urls counted by scanning]}``. A shard that cannot be
    counted raises ``ShardReadError``: it would otherwise drop out of the plan unseen."""
    indexes: dict[str, dict[str, IndexEntry]] = {}
    n_mels = None
    shards, to_scan = [], []
    for url in urls:
        folder = _parent(url)
        if folder is not None and folder not in indexes:
            index = read_index(_join(folder, INDEX_FILE), policy)
            indexes[folder] = {e.name: e for e in index[0]} if index else {}
            if index and n_mels is None:
                n_mels = index[1]
        entry = indexes.get(folder, {}).get(url.rsplit("/", 1)[-1])
        if entry is None:
            to_scan.append(len(shards))
            shards.append(Shard(url, -1))
        else:
            shards.append(Shard(url, entry.samples, entry.sha256, entry.bytes, entry.key_sketch))
    if to_scan:
        warnings.warn(f"{len(to_scan)} shard(s) have no index.json entry (first: {shards[to_scan[0]].url}); "
                      f"counting their samples by reading their tar headers", stacklevel=2)
        from tqdm import tqdm

        for i in tqdm(to_scan, desc="counting samples", unit="shard", disable=not progress or len(to_scan) < 8):
            keys = scan_keys(shards[i].url, policy)
            shards[i] = Shard(shards[i].url, len(keys), key_sketch=key_sketch(keys))
    return shards, {"n_mels": n_mels, "scanned": [shards[i].url for i in to_scan]}


def scan_keys(url: str, policy: RetryPolicy | None = None) -> list[str]:
    """The keys of a shard's samples (key groups), in order, reading headers only (data is seeked over)."""
    keys: list[str] = []
    with open_url(url, policy) as stream:
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



# -------------------------------------------------------------------------------------------- open


class _PipeStream(io.RawIOBase):
    """stdout of ``pipe:CMD``; a non-zero exit seen at end of data is an error (not when closed early)."""

    def __init__(self, command: str):
        self.command = command
        # stderr goes to a file, not a pipe: a chatty command (progress output) would block on a full
        # pipe nobody reads while we wait for its stdout.
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.errors)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.process.stdout.readinto(buffer)
        if n == 0:
            code = self.process.wait()
            if code != 0:
                self.errors.seek(0)
                message = self.errors.read().decode(errors="replace").strip()[-500:]
                raise OSError(f"command exited with status {code}: {message}")
        return n

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.errors.close()
        super().close()


def _import_fsspec(url: str):
    try:
        import fsspec
    except ImportError as error:
        raise ShardReadError(f"{url}: reading '{url.split('://')[0]}://' URLs needs fsspec "
                             f"(pip install fsspec s3fs/gcsfs), or use 'pipe:aws s3 cp {url} -'") from error
    return fsspec


def open_url(url: str, policy: RetryPolicy | None = None) -> BinaryIO:
    """A binary stream for a shard or index URL (local, http(s), pipe:, fsspec). Raises
    ``ShardReadError`` naming the URL (cause kept) when it cannot be opened. http(s) and fsspec
    reads retry per ``policy`` (None: ``shard_tools.retry.DEFAULT_POLICY``)."""
    try:
        if url.startswith("pipe:"):
            return io.BufferedReader(_PipeStream(url[len("pipe:"):]), 1 << 16)
        if url.startswith(("http://", "https://")):
            return open_http(url, policy)
        if _is_remote(url):
            fsspec = _import_fsspec(url)
            return open_fsspec(url, lambda: fsspec.open(url, "rb").open(), policy)
        return open(_local_path(url), "rb")
    except ShardReadError:
        raise
    except Exception as error:  # urllib, fsspec backends and the OS raise many types; all mean "unreachable"
        raise ShardReadError(f"{url}: cannot open ({type(error).__name__}: {error})") from error


# ------------------------------------------------------------------------------------------- tar


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

