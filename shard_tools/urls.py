"""Shard URLs: what a user types, the index.json beside the shards, and opening a URL.

``expand_urls`` (brace ranges, ``<a..b>``, lists, globs, folders, ``index.json``), ``resolve_shards``
(exact sample counts from the index, a header scan only for shards no index lists) and ``open_url``
(one opener per scheme in ``OPENERS``). Why each: docs/streaming.md, "Shard URLs".
"""

from __future__ import annotations

import glob
import io
import os
import posixpath
import re
import subprocess
import tempfile
import urllib.error
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Callable

from shard_tools.retry import RetryPolicy, open_fsspec, open_http
from shard_tools.shard_format import INDEX_FILE, Index, IndexEntry, key_sketch, parse_index
from shard_tools.tar import ShardReadError, scan_keys

RANGE_RE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class Shard:
    """One shard URL with its sample count (from index.json or a header scan), checksum and key
    sketch (``shard_format.key_sketch``; None where its index has none)."""

    url: str
    samples: int
    sha256: str | None = None
    bytes: int | None = None
    key_sketch: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ResolveInfo:
    """What ``resolve_shards`` learnt beside the shards: the mel bins the first index names (None
    without an index) and the shards no index lists, counted by a header scan."""

    n_mels: int | None
    scanned: list[str]


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


def url_scheme(url: str) -> str:
    """``pipe``, ``http``, ``s3``, ``file``, …; ``""`` for a plain path."""
    if url.startswith("pipe:"):
        return "pipe"
    return url.split("://", 1)[0] if "://" in url else ""


def _is_remote(url: str) -> bool:
    return url_scheme(url) not in ("", "file")


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
    return [_join(folder, entry.name) for entry in index.entries]


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


def read_index(index_url: str, policy: RetryPolicy | None = None) -> Index | None:
    """The ``Index`` of an ``index.json`` (local, http, fsspec); None when there is none
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
    index = parse_index(data, index_url)
    for entry in index.entries:
        if posixpath.isabs(entry.name) or ".." in re.split(r"[/\\]", entry.name):
            raise ValueError(f"{index_url}: shard entry {entry.name!r} is not inside the index's folder "
                             f"(names are relative to it, without '..')")
    return index


def resolve_shards(urls: list[str], progress: bool = True, policy: RetryPolicy | None = None
                   ) -> tuple[list[Shard], ResolveInfo]:
    """Shards with sample counts: from the ``index.json`` beside each shard where one lists it,
    else by a header scan (warned: it reads every such shard once), and a ``ResolveInfo``. A shard
    that cannot be counted raises ``ShardReadError``: it would otherwise drop out of the plan unseen."""
    indexes: dict[str, dict[str, IndexEntry]] = {}
    n_mels = None
    shards, to_scan = [], []
    for url in urls:
        folder = _parent(url)
        if folder is not None and folder not in indexes:
            index = read_index(_join(folder, INDEX_FILE), policy)
            indexes[folder] = {e.name: e for e in index.entries} if index else {}
            if index and n_mels is None:
                n_mels = index.n_mels
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
            with open_url(shards[i].url, policy) as stream:
                keys = scan_keys(stream, shards[i].url)
            shards[i] = Shard(shards[i].url, len(keys), key_sketch=key_sketch(keys))
    return shards, ResolveInfo(n_mels, [shards[i].url for i in to_scan])


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


def _open_local(url: str, policy: RetryPolicy | None) -> BinaryIO:
    return open(_local_path(url), "rb")


def _open_pipe(url: str, policy: RetryPolicy | None) -> BinaryIO:
    return io.BufferedReader(_PipeStream(url[len("pipe:"):]), 1 << 16)


def _open_fsspec(url: str, policy: RetryPolicy | None) -> BinaryIO:
    fsspec = _import_fsspec(url)
    return open_fsspec(url, lambda: fsspec.open(url, "rb").open(), policy)


# scheme -> opener(url, policy), as webdataset's gopen_schemes; any other ``proto://`` goes to fsspec.
OPENERS: dict[str, Callable[[str, RetryPolicy | None], BinaryIO]] = {
    "": _open_local, "file": _open_local, "pipe": _open_pipe, "http": open_http, "https": open_http}


def open_url(url: str, policy: RetryPolicy | None = None) -> BinaryIO:
    """A binary stream for a shard or index URL (local, http(s), pipe:, fsspec), by ``OPENERS``.
    Raises ``ShardReadError`` naming the URL (cause kept) when it cannot be opened. http(s) and fsspec
    reads retry per ``policy`` (None: ``shard_tools.retry.DEFAULT_POLICY``)."""
    try:
        return OPENERS.get(url_scheme(url), _open_fsspec)(url, policy)
    except ShardReadError:
        raise
    except Exception as error:  # urllib, fsspec backends and the OS raise many types; all mean "unreachable"
        raise ShardReadError(f"{url}: cannot open ({type(error).__name__}: {error})") from error
