"""The tar reader both ends use, against plain ``tarfile``: long names, skipping by seeking,
truncation reported with the URL and key."""

import io
import tarfile
from pathlib import Path

import pytest

from shard_tools.tar import iter_samples, scan_keys
from tests.conftest import write_mel_shards
from tests.test_urls import tar_keys


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    """Long names (GNU longname, pax path), a directory entry and a member without extension."""
    path = tmp_path / "x.tar"
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 60
    names = [f"{long_dir}/k{i}.{ext}" for i in range(3) for ext in ("mel.npy", "json")]
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(_dir_info(long_dir))
        for name in names + ["README"]:
            info = tarfile.TarInfo(name)
            data = name.encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        samples = list(iter_samples(f, str(path)))
    assert [s["__key__"] for s in samples] == [f"{long_dir}/k{i}" for i in range(3)]
    assert samples[1]["json"] == f"{long_dir}/k1.json".encode()
    with open(path, "rb") as f:
        assert scan_keys(f, str(path)) == [s["__key__"] for s in samples]  # headers only, the reader's keys


def _dir_info(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


class _CountingReader(io.RawIOBase):
    def __init__(self, data: bytes, seekable: bool):
        self.inner, self._seekable, self.bytes_read = io.BytesIO(data), seekable, 0

    def readable(self):
        return True

    def seekable(self):
        return self._seekable

    def seek(self, offset, whence=io.SEEK_SET):
        return self.inner.seek(offset, whence)

    def readinto(self, buffer):
        n = self.inner.readinto(buffer)
        self.bytes_read += n
        return n


@pytest.mark.parametrize("seekable", [True, False])
def test_skipped_samples_are_seeked_over(tmp_path, seekable):
    path = write_mel_shards(tmp_path / "train", [40])[0]
    data = Path(path).read_bytes()
    reader = _CountingReader(data, seekable)
    samples = list(iter_samples(reader, path, skip=37, limit=2))
    assert [s["__key__"] for s in samples] == tar_keys([path])[37:39]
    if seekable:  # headers only before the start: far less than the file
        assert reader.bytes_read < len(data) / 4
    with tarfile.open(path) as tar:
        member = tar.extractfile(f"{samples[0]['__key__']}.mel.npy").read()
    assert samples[0]["mel.npy"] == member


def test_truncated_shard_reports_url_and_key(tmp_path):
    path = write_mel_shards(tmp_path / "train", [3])[0]
    data = Path(path).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:1800])
    with open(cut, "rb") as f, pytest.raises(OSError, match=r"cut.tar: truncated tar .* in sample 's000_0000'"):
        list(iter_samples(f, str(cut)))
    with open(path, "rb") as f:
        assert len(scan_keys(f, path)) == 3
