"""Network faults: http(s) and fsspec shard reads retry transient faults, resume at the byte reached,
and give up by budget or deadline into a skipped-and-counted shard. A loopback server fails, drops,
stalls and trickles on purpose; keys through the loader are checked against plain ``tarfile``."""

import http.server
import io
import logging
import re
import threading
import time
from pathlib import Path

import fsspec
import pytest

from shard_tools import retry
from shard_tools.retry import RetryPolicy
from pipeline.stream import StreamError, StreamWarning, make_loader
from shard_tools.urls import ShardReadError, open_url
from tests.conftest import write_mel_shards
from tests.test_urls import eval_keys, tar_keys

FAST = RetryPolicy(retries=3, backoff=0.01, backoff_max=0.04, timeout=2.0, deadline=5.0)
TRICKLE = (256, 0.05)  # bytes per write, seconds between writes: 5 KB/s
SERVE_AT_MOST = 3.0  # seconds a stalling or trickling answer lasts, so the server always stops by itself


def _cut(size: int) -> int:
    """Bytes a dropped or stalled answer sends: a few samples' worth, so that every try gets further."""
    return min(size * 2 // 5, 2048)


class _FlakyServer(http.server.ThreadingHTTPServer):
    """Serves ``root`` over loopback. ``faults[path]`` lists what the next requests for ``path`` get,
    one per request, then normal answers: an HTTP status; "drop" (promises the whole body, sends
    ``_cut`` of it, hangs up); "stall" (sends ``_cut``, then nothing); "trickle" (all of it, slowly).
    ``ranges=False`` ignores Range headers; ``requests`` logs ``(path, Range header, status, fault)``."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.root, self.faults, self.requests, self.ranges = root, {}, [], True
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyServer

    def do_GET(self):
        queue = self.server.faults.get(self.path)
        fault = queue.pop(0) if queue else None
        asked = self.headers.get("Range")
        path = Path(self.server.root, self.path.lstrip("/"))
        status = fault if isinstance(fault, int) else 200 if path.is_file() else 404
        if status != 200:
            self.server.requests.append((self.path, asked, status, fault))
            return self.send_error(status)
        data = path.read_bytes()
        start = int(asked[len("bytes="):-1]) if asked and self.server.ranges else 0
        self.server.requests.append((self.path, asked, 206 if start else 200, fault))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        body = data[start:]
        if fault in ("drop", "stall"):
            self.wfile.write(body[:_cut(len(body))])
            if fault == "stall":
                self.wfile.flush()
                time.sleep(SERVE_AT_MOST)
            return
        step, pause = TRICKLE if fault == "trickle" else (len(body), 0.0)
        until = time.monotonic() + SERVE_AT_MOST
        try:
            for i in range(0, len(body), step):
                if time.monotonic() > until:
                    return
                self.wfile.write(body[i:i + step])
                self.wfile.flush()
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up on a trickle: what the deadline tests want

    def log_message(self, format, *args):  # noqa: A002  (the base class's signature)
        pass


@pytest.fixture
def server(tmp_path):
    srv = _FlakyServer(tmp_path)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def fast_policy(monkeypatch):
    """Short waits, through the default the loader's ``open_url`` calls read."""
    monkeypatch.setattr(retry, "DEFAULT_POLICY", FAST)


def retry_lines(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "shard_tools.retry" and name in r.getMessage()]


def assert_skipped(caught, url: str, reason: str) -> None:
    """Every warning is about ``url`` (the sample cut short, then the read error), one gives ``reason``."""
    messages = [str(w.message) for w in caught]
    assert all(url in m for m in messages) and any(re.search(reason, m) for m in messages), messages


def train_keys(urls, processor, **kwargs) -> tuple[list[str], object]:
    """All real keys of one training epoch (interleaved cursors start mid-shard), and the loader."""
    loader = make_loader(urls, processor.tokenizer, batch_size=3, train=True, shuffle_buffer=4, interleave=2,
                         **kwargs)
    keys = [k for b in loader for k, pad in zip(b["keys"], b["is_pad"].tolist()) if not pad]
    return keys, loader


def test_policy_checks_and_backoff():
    with pytest.raises(ValueError, match="retries=-1: must be at least 0"):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError, match="backoff=5: must be at least 0 and at most the largest backoff"):
        RetryPolicy(backoff=5, backoff_max=1)
    policy = RetryPolicy(backoff=1.0, backoff_max=5.0)
    for attempt, top in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        assert top / 2 <= policy.delay(attempt) <= top


def test_500_once_then_served_loses_nothing(tmp_path, server, tiny_processor, caplog):
    paths = write_mel_shards(tmp_path / "train", [4, 5, 3])
    server.faults = {"/train/001.tar": [500], "/train/index.json": [503]}
    with caplog.at_level(logging.WARNING, logger="shard_tools.retry"):
        keys, loader = train_keys(f"{server.url}/train/<000..002>.tar", tiny_processor)
    assert sorted(keys) == sorted(tar_keys(paths)) and loader.skipped == 0
    assert len(retry_lines(caplog, "001.tar: HTTPError: HTTP Error 500")) == 1
    assert len(retry_lines(caplog, "index.json: HTTPError: HTTP Error 503")) == 1  # counts still from the index
    assert [r[2] for r in server.requests if r[0] == "/train/001.tar"][:2] == [500, 200]


@pytest.mark.parametrize("ranges", [True, False])
def test_dropped_connection_resumes_at_the_byte_reached(tmp_path, server, tiny_processor, caplog, ranges):
    """With Range: the retry asks for the rest and gets 206. Without: the server re-sends the whole
    shard (200) and the bytes already delivered are dropped. Either way the bytes equal the file."""
    paths = write_mel_shards(tmp_path / "train", [6, 5])
    server.ranges = ran = ranges
    data = Path(paths[0]).read_bytes()
    server.faults = {"/train/000.tar": ["drop"]}
    with open_url(f"{server.url}/train/000.tar") as stream:
        assert stream.read() == data and stream.raw.retries == 1
    cut = _cut(len(data))
    assert server.requests == [("/train/000.tar", None, 200, "drop"),
                               ("/train/000.tar", f"bytes={cut}-", 206 if ran else 200, None)]
    assert retry_lines(caplog, f"IncompleteRead(0 bytes read, {len(data) - cut} more expected); retry 1 of 3")
    server.faults = {"/train/000.tar": ["drop"], "/train/001.tar": ["drop", "drop"]}
    keys, loader = train_keys(f"{server.url}/train/", tiny_processor)
    assert sorted(keys) == sorted(tar_keys(paths)) and loader.skipped == 0


def test_stall_past_the_read_timeout_is_retried(tmp_path, server, monkeypatch, caplog):
    path = write_mel_shards(tmp_path / "train", [6])[0]
    monkeypatch.setattr(retry, "DEFAULT_POLICY", RetryPolicy(retries=2, backoff=0.01, timeout=0.3))
    server.faults = {"/train/000.tar": ["stall"]}
    with open_url(f"{server.url}/train/000.tar") as stream:
        assert stream.read() == Path(path).read_bytes()
    assert retry_lines(caplog, "TimeoutError") and [r[2] for r in server.requests] == [200, 206]


def test_trickling_server_meets_the_shard_deadline(tmp_path, server, tiny_processor, monkeypatch):
    """Every byte comes within the read timeout, but the shard as a whole is too slow: its samples
    are skipped and counted (on_error=skip), or the stream stops (on_error=raise)."""
    paths = write_mel_shards(tmp_path / "train", [4, 6, 3])
    monkeypatch.setattr(retry, "DEFAULT_POLICY", RetryPolicy(retries=3, backoff=0.01, timeout=1.0, deadline=0.6))
    url = f"{server.url}/train/<000..002>.tar"
    server.faults = {"/train/001.tar": ["trickle"] * 9}
    started = time.monotonic()
    with pytest.warns(StreamWarning) as caught:
        keys = eval_keys(url, tiny_processor, max_skip_fraction=0.5)
    assert_skipped(caught, "001.tar", r"001.tar: read failed.*RetryError: shard deadline of 0.6 s passed")
    assert keys == tar_keys([paths[0], paths[2]]) and time.monotonic() - started < 2.5
    server.faults = {"/train/001.tar": ["trickle"] * 9}
    with pytest.raises(StreamError, match="001.tar"):  # the sample cut short by the deadline stops it
        eval_keys(url, tiny_processor, on_error="raise")


def test_retry_budget_spent_skips_or_raises(tmp_path, server, tiny_processor, caplog):
    paths = write_mel_shards(tmp_path / "train", [4, 6, 3])
    url = f"{server.url}/train/<000..002>.tar"
    server.faults = {"/train/001.tar": [502] * 9}
    loader = make_loader(url, tiny_processor.tokenizer, batch_size=3, train=False, max_skip_fraction=0.5)
    with pytest.warns(StreamWarning, match=r"001.tar: cannot open \(RetryError: gave up at byte 0 after 3 retries "
                                           r"\(last: HTTPError: HTTP Error 502"):
        keys = [k for b in loader for k, pad in zip(b["keys"], b["is_pad"].tolist()) if not pad]
    assert keys == tar_keys([paths[0], paths[2]]) and loader.skipped == 6
    assert len(retry_lines(caplog, "001.tar: HTTPError: HTTP Error 502")) == 3
    assert len([r for r in server.requests if r[0] == "/train/001.tar"]) == 4
    server.faults = {"/train/001.tar": [502] * 9}
    with pytest.raises(StreamError, match=r"001.tar: cannot open \(RetryError: gave up at byte .* after 3 retries"):
        eval_keys(url, tiny_processor, on_error="raise")
    # Dropped on every try: each try gets further, then the rest of the shard is skipped. What was
    # read is delivered once; nothing is doubled.
    server.faults = {"/train/001.tar": ["drop"] * 9}
    with pytest.warns(StreamWarning) as caught:
        keys = eval_keys(url, tiny_processor, max_skip_fraction=0.5)
    assert_skipped(caught, "001.tar", r"001.tar: read failed in sample 's001_\d+' .*gave up at byte .* after 3 retries")
    shard = tar_keys([paths[1]])
    got = [k for k in keys if k in shard]
    assert 0 < len(got) < len(shard) and got == shard[:len(got)]
    assert keys == tar_keys([paths[0]]) + got + tar_keys([paths[2]])


@pytest.mark.parametrize("status", [404, 403])
def test_client_errors_are_not_retried(tmp_path, server, tiny_processor, caplog, status):
    paths = write_mel_shards(tmp_path / "train", [4, 6])
    server.faults = {"/train/001.tar": [status] * 9}
    with pytest.raises(ShardReadError, match=rf"^{server.url}/train/001.tar: cannot open \(HTTPError: HTTP Error "
                                             rf"{status}: .*\)$"):
        open_url(f"{server.url}/train/001.tar")
    with pytest.warns(StreamWarning, match=f"001.tar: cannot open.*{status}"):
        keys = eval_keys(f"{server.url}/train/", tiny_processor, max_skip_fraction=0.7)
    assert keys == tar_keys(paths[:1])
    assert len([r for r in server.requests if r[0] == "/train/001.tar"]) == 2 and not retry_lines(caplog, "")


def test_missing_index_is_absent_not_retried(tmp_path, server, tiny_processor, caplog):
    paths = write_mel_shards(tmp_path / "train", [4, 6], index=False)
    with pytest.warns(UserWarning, match="counting their samples"):
        keys = eval_keys(f"{server.url}/train/{{000..001}}.tar", tiny_processor)
    assert keys == tar_keys(paths) and not retry_lines(caplog, "")
    assert [r[2] for r in server.requests if r[0] == "/train/index.json"] == [404]


class _Unavailable(Exception):
    """What an fsspec backend's HTTP error looks like: an exception carrying the status."""

    status = 503


class _FlakyFile(io.BytesIO):
    """A file that resets the connection once, when a read reaches 40% of it."""

    def __init__(self, fs: "_FlakyFS", path: str):
        super().__init__(fs.files[path])
        self.fs, self.path, self.cut = fs, path, len(fs.files[path]) * 2 // 5

    def read(self, n=-1):
        if (self.path, "read") not in self.fs.failed:
            if self.tell() >= self.cut:
                self.fs.failed.add((self.path, "read"))
                raise ConnectionResetError(104, "Connection reset by peer")
            n = self.cut - self.tell() if n is None or n < 0 else min(n, self.cut - self.tell())
        return super().read(n)


class _FlakyFS(fsspec.AbstractFileSystem):
    """An in-memory read-only filesystem whose files each fail twice: the first open answers 503,
    the first read past 40% resets the connection."""

    protocol = "flakyfs"
    files: dict[str, bytes] = {}
    failed: set[tuple[str, str]] = set()

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if path not in self.files:
            raise FileNotFoundError(path)
        if (path, "open") not in self.failed:
            self.failed.add((path, "open"))
            raise _Unavailable(f"{path}: 503 Slow Down")
        return _FlakyFile(self, path)


def test_fsspec_reads_retry_and_resume(tmp_path, tiny_processor, caplog):
    paths = write_mel_shards(tmp_path / "train", [5, 7])
    fsspec.register_implementation("flakyfs", _FlakyFS, clobber=True)
    _FlakyFS.files = {f"wcs/train/{p.name}": p.read_bytes() for p in (tmp_path / "train").iterdir()}
    _FlakyFS.failed = set()
    keys, loader = train_keys("flakyfs://wcs/train/{000..001}.tar", tiny_processor)
    assert sorted(keys) == sorted(tar_keys(paths)) and loader.skipped == 0
    for name in ("index.json", "000.tar", "001.tar"):
        assert len(retry_lines(caplog, f"{name}: _Unavailable")) == 1
        assert len(retry_lines(caplog, f"{name}: ConnectionResetError")) == 1
    _FlakyFS.failed = set()
    with open_url("flakyfs://wcs/train/000.tar", RetryPolicy(retries=1, backoff=0.01)) as stream, \
            pytest.raises(OSError, match=r"gave up at byte \d+ after 1 retry \(last: ConnectionResetError"):
        stream.read()


def test_the_loaders_policy_governs_index_reads_too(tmp_path, server, tiny_processor):
    """``DataSettings.retry`` (data_config.retry.retries, ...) reaches index.json and header scans, not only
    shard reads: with no retries allowed, a 503 on the index is the error, not a retried success."""
    write_mel_shards(tmp_path / "train", [4, 6])
    url = f"{server.url}/train/{{000..001}}.tar"
    server.faults["/train/index.json"] = [503]
    with pytest.raises(StreamError, match="index.json"):
        make_loader(url, tiny_processor.tokenizer, train=False, retry=RetryPolicy(retries=0))
    server.faults["/train/index.json"] = [503]
    assert len(make_loader(url, tiny_processor.tokenizer, train=False, retry=FAST).dataset.shards) == 2
