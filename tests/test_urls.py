"""Shard URL expansion, index lookup and opening (local, http on loopback, pipe:, fsspec memory://);
the tar reader is in tests/test_tar.py."""

import functools
import http.server
import json
import re
import tarfile
import threading
import warnings
from pathlib import Path

import pytest

from shard_tools.retry import RetryPolicy
from pipeline.stream import StreamError, make_loader
from shard_tools.tar import iter_samples
from shard_tools.urls import expand_braces, expand_urls, open_url, read_index, resolve_shards
from tests.conftest import write_mel_shards


def tar_keys(paths) -> list[str]:
    keys = []
    for path in paths:
        with tarfile.open(path) as tar:
            keys += [n[:-len(".json")] for n in tar.getnames() if n.endswith(".json")]
    return keys


def eval_keys(urls, processor, **kwargs) -> list[str]:
    stream = make_loader(urls, processor.tokenizer, batch_size=3, train=False, **kwargs)
    return [k for b in stream for k, pad in zip(b["keys"], b["is_pad"].tolist()) if not pad]


def test_brace_forms():
    assert expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_braces("a/<8..10>.tar") == ["a/8.tar", "a/9.tar", "a/10.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("plain{}") == ["plain{}"]
    with pytest.raises(ValueError, match="<a,b>"):
        expand_braces("data/<a,b>.tar")


def test_expand_local_forms(tmp_path):
    paths = write_mel_shards(tmp_path / "train", [1, 2, 1, 3])
    d = tmp_path / "train"
    assert expand_urls(f"{d}/{{000..002}}.tar") == paths[:3]
    assert expand_urls(f"{d}/<000..002>.tar") == paths[:3]
    assert expand_urls(f"{d}/000.tar, {d}/{{002,003}}.tar") == [paths[0], paths[2], paths[3]]
    assert expand_urls([f"{d}/003.tar", Path(paths[1])]) == [paths[3], paths[1]]
    assert expand_urls(f"{d}/00[13].tar") == [paths[1], paths[3]]
    assert expand_urls(str(d)) == expand_urls(f"{d}/index.json") == paths
    assert expand_urls(f"file://{d}/001.tar") == [paths[1]]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_urls(f"{d}/*.zip")
    with pytest.raises(ValueError, match="more than once"):
        expand_urls(f"{d}/000.tar,{d}/000.tar")


def test_counts_from_index_and_by_header_scan(tmp_path):
    paths = write_mel_shards(tmp_path / "train", [4, 0, 7])
    shards, info = resolve_shards(expand_urls(str(tmp_path / "train")))
    assert [s.samples for s in shards] == [4, 0, 7] and info.n_mels == 80 and not info.scanned
    assert all(len(s.sha256) == 64 for s in shards)
    (tmp_path / "train" / "index.json").unlink()
    with pytest.warns(UserWarning, match="counting their samples"):
        shards, info = resolve_shards(expand_urls(str(tmp_path / "train")))
    assert [s.samples for s in shards] == [len(tar_keys([p])) for p in paths] and info.scanned == paths


def test_broken_index_is_an_error(tmp_path):
    write_mel_shards(tmp_path / "train", [2])
    (tmp_path / "train" / "index.json").write_text('{"shards": [{"name": "000.tar"}]}')
    with pytest.raises(ValueError, match="index.json"):
        read_index(str(tmp_path / "train" / "index.json"))


def test_an_index_of_a_version_this_release_does_not_read_is_refused(tmp_path):
    """A newer release's index.json is refused in one line naming the file, its version and the versions
    this release reads, rather than misread; a version-1 index loads and says which version it is."""
    write_mel_shards(tmp_path / "train", [2, 3])
    path = tmp_path / "train" / "index.json"
    index = read_index(str(path))
    assert (index.version, index.split, index.n_mels, [e.samples for e in index.entries]) == (1, "train", 80, [2, 3])
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 2}))
    line = f"{path}: whisper-caption-stream version 2, this release reads version(s) 1"
    for read in (lambda: read_index(str(path)), lambda: expand_urls(str(path.parent)),
                 lambda: resolve_shards([str(path.parent / "000.tar")])):
        with pytest.raises(ValueError, match=f"^{re.escape(line)}$"):
            read()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; ``NAME.cut`` promises all of NAME's bytes, sends half, and hangs up."""

    def do_GET(self):
        if self.path.endswith("index.json") and Path(self.directory, "SERVER_ERROR").exists():
            return self.send_error(500)
        if not self.path.endswith(".cut"):
            return super().do_GET()
        data = Path(self.directory, self.path.lstrip("/")[:-len(".cut")]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A loopback http.server over tmp_path, in a thread."""
    handler = functools.partial(_Handler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_shards_with_index(tmp_path, http_root, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [3, 5, 2])
    base = f"{http_root}/train"
    urls = expand_urls(f"{base}/{{000..002}}.tar")
    assert urls == [f"{base}/00{i}.tar" for i in range(3)]
    assert expand_urls(f"{base}/") == expand_urls(f"{base}/index.json") == urls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counts come from the index over http: no scan warning
        shards, _ = resolve_shards(urls)
    assert [s.samples for s in shards] == [3, 5, 2]
    assert eval_keys(f"{base}/<000..002>.tar", tiny_processor) == tar_keys(paths)
    # A shard the server does not have: its samples are skipped, reported with the URL.
    (tmp_path / "train" / "001.tar").unlink()
    with pytest.warns(UserWarning, match="001.tar"):
        keys = eval_keys(f"{base}/", tiny_processor, max_skip_fraction=0.6)
    assert keys == tar_keys([paths[0], paths[2]])


def test_http_connection_lost_mid_shard_names_url_and_key(tmp_path, http_root):
    write_mel_shards(tmp_path / "train", [30])
    url = f"{http_root}/train/000.tar.cut"
    no_retry = RetryPolicy(retries=0)  # the error once retries are spent (tests/test_retry.py retries)
    with open_url(url, no_retry) as stream, pytest.raises(OSError, match=r"000.tar.cut: .*in sample 's000_00\d\d'"):
        list(iter_samples(stream, url))


def test_http_without_index_scans(tmp_path, http_root):
    paths = write_mel_shards(tmp_path / "train", [3, 4], index=False)
    with pytest.warns(UserWarning, match="counting their samples"):
        shards, _ = resolve_shards(expand_urls(f"{http_root}/train/{{000..001}}.tar"))
    assert [s.samples for s in shards] == [len(tar_keys([p])) for p in paths]


def test_pipe_and_fsspec_urls(tmp_path, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [2, 3])
    with pytest.warns(UserWarning, match="counting their samples"):
        keys = eval_keys(f"pipe:cat {tmp_path}/train/{{000..001}}.tar", tiny_processor)
    assert keys == tar_keys(paths)
    with pytest.raises(OSError, match="status"):
        with open_url(f"pipe:cat {tmp_path}/missing.tar") as stream:
            stream.read()
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for name in ("000.tar", "001.tar", "index.json"):
        fs.pipe(f"/wcs/train/{name}", (tmp_path / "train" / name).read_bytes())
    try:
        assert eval_keys("memory://wcs/train/{000..001}.tar", tiny_processor) == tar_keys(paths)
    finally:
        fs.rm("/wcs", recursive=True)


def test_a_server_error_on_index_json_is_not_taken_for_no_index(tmp_path, http_root, tiny_processor):
    paths = write_mel_shards(tmp_path / "train", [3, 2])
    (tmp_path / "SERVER_ERROR").touch()  # the loopback server answers 500 for every index.json
    with pytest.raises(StreamError, match="500"):
        make_loader(f"{http_root}/train/{{000..001}}.tar", tiny_processor.tokenizer, batch_size=2)
    (tmp_path / "SERVER_ERROR").unlink()
    (tmp_path / "train" / "index.json").unlink()  # 404: absent, so the shards are counted by scanning
    with pytest.warns(UserWarning, match="counting their samples"):
        assert eval_keys(f"{http_root}/train/{{000..001}}.tar", tiny_processor) == tar_keys(paths)


def test_index_entries_outside_the_index_folder_are_refused(tmp_path, tiny_processor):
    """docs/FORMAT.md: shard names are relative to the index's folder. An index naming ``../x`` or
    an absolute path would have the loader read a file outside it: refused when resolving."""
    write_mel_shards(tmp_path / "train", [2, 3])
    outside = write_mel_shards(tmp_path / "private", [4])[0]
    index_path = tmp_path / "train" / "index.json"
    index = json.loads(index_path.read_text())
    for name in ("../private/000.tar", outside, "sub/../../private/000.tar"):
        index["shards"][1]["name"] = name
        index_path.write_text(json.dumps(index))
        for spec in (str(tmp_path / "train"), str(index_path), f"{tmp_path}/train/000.tar"):
            with pytest.raises(StreamError, match=re.escape(f"{index_path}: shard entry '{name}' is not inside")):
                make_loader(spec, tiny_processor.tokenizer)
