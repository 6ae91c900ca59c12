"""Retries for network shard reads: a transient fault is retried with backoff and the read goes on
from the byte it had reached, so the tar reader above never sees it. What counts as transient, the
per-shard limits (``retries``, a ``deadline`` counted only inside reads) and the http Range rules:
docs/streaming.md, "Retries".
"""

from __future__ import annotations

import http.client
import io
import logging
import math
import random
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 60.0  # seconds without a byte before an http read fails
CHUNK = 1 << 16  # read size of the buffered stream handed out, and of dropping re-sent bytes
RETRY_STATUS = (408, 429)  # the 4xx answers that mean "try again"; every 5xx does too
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-\d+/(\d+|\*)$")
_jitter = random.Random()  # its own generator: a retry must not move the global one a seeded run uses


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one shard read tries. ``retries``: most retries per shard (0: the first fault
    fails); ``backoff``: seconds before the first retry, doubled per retry up to ``backoff_max``
    (each wait drawn from the upper half, so ranks that failed together do not retry together);
    ``timeout``: seconds an http read waits for a byte; ``deadline``: seconds one shard may spend
    in its reads in all, None for no limit."""

    retries: int = field(default=6, metadata={"help": "most retries of one shard (0: the first fault fails)"})
    backoff: float = field(default=1.0, metadata={"help": "seconds before the first retry, doubled per retry"})
    backoff_max: float = field(default=30.0, metadata={"help": "longest wait between retries, in seconds"})
    timeout: float = field(default=HTTP_TIMEOUT, metadata={"help": "seconds an http read waits for a byte"})
    deadline: float | None = field(default=1800.0, metadata={"help": "seconds one shard may spend reading in "
                                                                     "all; null: none"})

    def __post_init__(self):
        problems = [f"{name}={getattr(self, name)!r}: {why}" for name, bad, why in (
            ("retries", not self.retries >= 0, "must be at least 0"),
            ("backoff", not 0 <= self.backoff <= self.backoff_max, "must be at least 0 and at most the largest backoff"),
            ("backoff_max", not math.isfinite(self.backoff_max), "must be finite (time.sleep takes no inf)"),
            ("timeout", not 0 < self.timeout < math.inf, "must be above 0 and finite (sockets take no inf)"),
            ("deadline", not (self.deadline is None or 0 < self.deadline < math.inf), "must be above 0, or None")) if bad]
        if problems:
            raise ValueError("\n".join(problems))

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (from 1)."""
        top = min(self.backoff_max, self.backoff * 2 ** (retry - 1))
        return top * (0.5 + 0.5 * _jitter.random())


DEFAULT_POLICY = RetryPolicy()  # read at each open, so a process can set its own


class RetryError(OSError):
    """A transient fault that outlasted the retry budget or the shard deadline."""


def is_transient(error: BaseException) -> bool:
    """Whether a later try may not meet ``error`` (docs/streaming.md, "Retries")."""
    if isinstance(error, urllib.error.HTTPError):  # an answer: judged by its status, not as a URLError
        return error.code >= 500 or error.code in RETRY_STATUS
    if isinstance(error, urllib.error.URLError):  # urllib wraps refused connections and timeouts
        return isinstance(error.reason, BaseException) and is_transient(error.reason)
    status = getattr(error, "status", None) or getattr(error, "code", None)  # fsspec backends' HTTP errors
    if isinstance(status, int):
        return status >= 500 or status in RETRY_STATUS
    return isinstance(error, (ConnectionError, TimeoutError, http.client.IncompleteRead,
                              http.client.BadStatusLine, ssl.SSLEOFError))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _Resumable(io.RawIOBase):
    """A read-only stream that reopens at the byte reached after a transient fault. Subclasses give
    ``_open()`` (sets ``_inner`` positioned at ``pos``) and ``_chunk(n)`` (at most n bytes, b"" at
    the end)."""

    def __init__(self, url: str, policy: RetryPolicy):
        self.url, self.policy = url, policy
        self.pos, self.size, self.retries = 0, None, 0
        self._inner, self._spent, self._entered = None, 0.0, 0.0
        try:
            self._run(lambda: None)
        except BaseException:
            self.close()  # the caller never gets the stream, so it cannot close it
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._run(lambda: self._chunk(len(buffer)))
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        super().close()

    def _run(self, step: Callable):
        """``step()`` on an open inner stream, reopening and retrying after transient faults."""
        self._entered = time.monotonic()
        try:
            while True:
                self._check_deadline()
                try:
                    if self._inner is None:
                        self._open()
                    return step()
                except Exception as error:
                    if not is_transient(error):
                        raise
                    self._back_off(error)
        finally:
            self._spent += time.monotonic() - self._entered

    def _left(self) -> float:
        """Seconds of the shard deadline left."""
        if self.policy.deadline is None:
            return float("inf")
        return self.policy.deadline - self._spent - (time.monotonic() - self._entered)

    def _where(self) -> str:
        """Where the read stands and what it cost, for messages."""
        spent = f"{self.retries} retr{'y' if self.retries == 1 else 'ies'}"
        return f"byte {self.pos}" + (f" of {self.size}" if self.size is not None else "") + f" after {spent}"

    def _check_deadline(self) -> None:
        if self._left() <= 0:
            raise RetryError(f"shard deadline of {self.policy.deadline:g} s passed at {self._where()}")

    def _back_off(self, error: Exception) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None
        if isinstance(error, urllib.error.HTTPError):
            error.close()  # it holds the error answer's connection
        if self.retries >= self.policy.retries:
            raise RetryError(f"gave up at {self._where()} (last: {_describe(error)})") from error
        wait = self.policy.delay(self.retries + 1)
        if wait >= self._left():
            raise RetryError(f"shard deadline of {self.policy.deadline:g} s would pass before the next retry, "
                             f"at {self._where()} (last: {_describe(error)})") from error
        self.retries += 1
        log.warning("%s: %s; retry %d of %d in %.2f s from byte %d", self.url, _describe(error), self.retries,
                    self.policy.retries, wait, self.pos)
        time.sleep(wait)

    def _drop(self, n: int) -> None:
        """Read and drop the first ``n`` bytes of a reopened stream that could not start at ``pos``."""
        while n:
            self._check_deadline()
            data = self._chunk(min(n, CHUNK))
            if not data:
                raise http.client.IncompleteRead(b"", n)
            n -= len(data)



class _HttpStream(_Resumable):
    etag = None  # a class default: the base __init__ opens (and sets it) before a subclass __init__ could

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        request = urllib.request.Request(self.url, headers=headers)
        self._inner = response = urllib.request.urlopen(request, timeout=min(self.policy.timeout, self._left()))
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = CONTENT_RANGE_RE.match(content_range)
            if not match or int(match[1]) != self.pos:
                raise OSError(f"asked for bytes {self.pos}- and got 206 with Content-Range {content_range!r}")
            size = None if match[2] == "*" else int(match[2])
        else:
            length = response.headers.get("Content-Length")
            size = int(length) if length is not None else None
        etag = response.headers.get("ETag")
        resized = self.size is not None and size is not None and size != self.size
        if resized or (self.etag and etag and etag != self.etag):
            raise OSError(f"the shard changed on the server between tries (size {self.size} -> {size}, "
                          f"ETag {self.etag} -> {etag})")
        self.size, self.etag = size if size is not None else self.size, etag
        if response.status != 206 and self.pos:
            self._drop(self.pos)  # the server ignored Range and sent the shard from its start

    def _chunk(self, n: int) -> bytes:
        # read1: one socket read, so the deadline is checked between reads however slow the bytes come
        data = self._inner.read1(n)
        if not data and n and self.size is not None and self.pos < self.size:
            raise http.client.IncompleteRead(b"", self.size - self.pos)  # read1 reports a cut body as its end
        return data


class _FileStream(_Resumable):
    """A file ``opener()`` opens afresh on each try (fsspec: the backend keeps its own timeouts)."""

    def __init__(self, url: str, policy: RetryPolicy, opener: Callable[[], BinaryIO]):
        self._opener, self._seekable = opener, False
        super().__init__(url, policy)

    def _open(self) -> None:
        self._inner = self._opener()
        self._seekable = self._inner.seekable()
        if self._seekable:
            self._inner.seek(self.pos)
        else:
            self._drop(self.pos)

    def _chunk(self, n: int) -> bytes:
        return self._inner.read(n)

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation(f"{self.url}: not seekable")
        self.pos = self._run(lambda: self._inner.seek(offset, whence))
        return self.pos


def open_http(url: str, policy: RetryPolicy | None = None) -> BinaryIO:
    """A buffered stream of an http(s) URL that retries and resumes per ``policy``."""
    return io.BufferedReader(_HttpStream(url, policy or DEFAULT_POLICY), CHUNK)


def open_fsspec(url: str, opener: Callable[[], BinaryIO], policy: RetryPolicy | None = None) -> BinaryIO:
    """A buffered stream of the file ``opener()`` opens (an fsspec URL), retried and resumed per ``policy``."""
    return io.BufferedReader(_FileStream(url, policy or DEFAULT_POLICY, opener), CHUNK)
