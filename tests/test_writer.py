"""The shard writer against the references: ``tarfile``'s own output, ``tar tf``, hashlib, numpy."""

import hashlib
import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from shard_tools.fileio import write_json
from shard_tools.shard_format import Index, Reject, SampleMeta, encode_sample
from shard_tools import writer


def members(key: str, frames: int = 7, n_mels: int = 80) -> list[tuple[str, bytes]]:
    mel = np.linspace(-1, 1, n_mels * frames, dtype=np.float32).reshape(n_mels, frames)
    return encode_sample(key, mel, SampleMeta([f"caption of {key}"], f"{key}.wav", frames / 100, 16000, -0.5))


def tarfile_reference(members_list: list[tuple[str, bytes]]) -> bytes:
    """The same members written by ``tarfile`` itself with the fixed metadata FORMAT.md asks for."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members_list:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0, 0o444, 0, 0, "", "")
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_encoded_samples_hold_float16_mel_and_json():
    (mel_name, mel_bytes), (json_name, json_bytes) = members("a_b-0123456789", frames=5)
    assert (mel_name, json_name) == ("a_b-0123456789.mel.npy", "a_b-0123456789.json")
    mel = np.load(io.BytesIO(mel_bytes), allow_pickle=False)
    assert mel.dtype == np.float16 and mel.shape == (80, 5)
    assert json.loads(json_bytes)["captions"] == ["caption of a_b-0123456789"]


def test_shards_are_what_tarfile_writes_and_roll_by_sample_count(tmp_path):
    entries = []
    w = writer.ShardWriter(tmp_path, samples_per_shard=2, max_bytes=None, on_shard=entries.append)
    samples = [members(f"k{i}") for i in range(5)]
    for i, sample in enumerate(samples):
        w.add(f"k{i}", sample, seconds=1.5, truncated=i == 3, position=i)
    w.close(next_input=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000.tar", "001.tar", "002.tar"]  # no .tmp left
    for entry, group in zip(entries, [samples[0:2], samples[2:4], samples[4:]]):
        data = (tmp_path / entry["name"]).read_bytes()
        assert data == tarfile_reference([m for sample in group for m in sample])
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["samples"] == len(group) and entry["seconds"] == 1.5 * len(group)
    assert [e["truncated"] for e in entries] == [0, 1, 0]
    assert [e["next_input"] for e in entries] == [2, 4, 5]
    with tarfile.open(tmp_path / "000.tar") as tar:
        info = tar.getmembers()[0]
        assert (info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname) == (0, 0o444, 0, 0, "", "")
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "tf", str(tmp_path / "001.tar")], capture_output=True, text=True, check=True)
        assert listing.stdout.split() == ["k2.mel.npy", "k2.json", "k3.mel.npy", "k3.json"]


def test_shards_roll_by_size_and_long_keys_fit(tmp_path):
    entries = []
    max_bytes = 40 * 1024
    w = writer.ShardWriter(tmp_path, samples_per_shard=None, max_bytes=max_bytes, on_shard=entries.append)
    long_key = "x" * 150 + "-0123456789"  # longer than a plain ustar name field
    sizes = []
    for i in range(12):
        key = f"{long_key}{i:02d}"
        sample = members(key, frames=20 + 10 * i)
        sizes.append(sum(len(piece) for member in sample for piece in writer.member_pieces(*member)))
        w.add(key, sample, seconds=1.0, truncated=False, position=i)
    w.close(next_input=12)
    assert sum(e["samples"] for e in entries) == 12 and len(entries) > 2
    for entry in entries:
        assert entry["bytes"] == (tmp_path / entry["name"]).stat().st_size
        assert entry["bytes"] <= max_bytes or entry["samples"] == 1  # a too-big sample gets its own shard
    with tarfile.open(tmp_path / entries[0]["name"]) as tar:
        assert tar.getnames()[0] == f"{long_key}00.mel.npy"
    # Each shard is as full as it can be: the next sample would not have fit.
    first = 0
    for entry in entries[:-1]:
        n = entry["samples"]
        assert writer.archive_size(sum(sizes[first:first + n + 1])) > max_bytes
        first += n


def test_shard_names_widen_past_999():
    assert [writer.shard_name(i) for i in (0, 7, 999, 1000, 12345)] == [
        "000.tar", "007.tar", "999.tar", "1000.tar", "12345.tar"]


def test_abort_removes_the_partial_shard(tmp_path):
    w = writer.ShardWriter(tmp_path, samples_per_shard=10, max_bytes=None)
    w.add("k", members("k"), seconds=1.0, truncated=False, position=0)
    assert [p.name for p in tmp_path.iterdir()] == ["000.tar.tmp"]
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_index_and_rejects(tmp_path):
    shards = [{"name": "000.tar", "samples": 2, "seconds": 1.25, "bytes": 10240, "sha256": "ab", "truncated": 1,
               "next_input": 3},
              {"name": "001.tar", "samples": 1, "seconds": 0.5, "bytes": 10240, "sha256": "cd", "truncated": 0,
               "next_input": 4}]
    index = Index("train", 128, [writer.index_entry(s) for s in shards], truncated=1, rejected=2).to_dict()
    assert index["format"] == "whisper-caption-stream" and index["version"] == 1 and index["split"] == "train"
    assert index["features"] == {"kind": "whisper-log-mel", "n_mels": 128, "sample_rate": 16000, "n_fft": 400,
                                 "hop_length": 160, "dtype": "float16"}
    assert index["shards"][0] == {"name": "000.tar", "samples": 2, "seconds": 1.25, "bytes": 10240, "sha256": "ab"}
    assert index["totals"] == {"shards": 2, "samples": 3, "seconds": 1.75, "bytes": 20480, "truncated": 1,
                               "rejected": 2}
    write_json(tmp_path / "index.json", index)
    assert json.loads((tmp_path / "index.json").read_text()) == index
    writer.write_rejects(tmp_path / "rejects.jsonl",
                         [Reject("a/b.wav", "", "silent", 2)])
    assert [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()] == [
        {"path": "a/b.wav", "reason": "silent"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "rejects.jsonl"]  # no .tmp left


def test_progress_log_appends_and_survives_a_cut_line(tmp_path):
    entry = {"name": "000.tar", "samples": 2, "seconds": 1.0, "bytes": 10240, "sha256": "ab", "truncated": 0}
    rejects = [Reject("a", "", "silent", 1), Reject("b", "", "silent", 4), Reject("c", "", "silent", 7)]
    log = writer.ProgressLog(tmp_path, {"n_mels": 80}, [], [])
    log.add_shard({**entry, "next_input": 3}, rejects[:1])
    log.add_shard({**entry, "name": "001.tar", "next_input": 6}, rejects[1:2])
    progress = writer.read_progress(tmp_path)
    assert progress["settings"] == {"n_mels": 80} and progress["complete"] is False
    assert [s["name"] for s in progress["shards"]] == ["000.tar", "001.tar"] and progress["rejects"] == rejects[:2]
    log.finish(rejects[2:], {"count": 8, "digest": "ef"})
    assert writer.read_progress(tmp_path)["complete"] is True
    assert writer.read_progress(tmp_path)["rejects"] == rejects
    # A kill in the middle of a write: the cut line and anything after it are ignored.
    path = tmp_path / ".progress.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    assert [s["name"] for s in writer.read_progress(tmp_path)["shards"]] == ["000.tar"]
    # Starting over from kept shards regroups their rejects by shard.
    writer.ProgressLog(tmp_path, {"n_mels": 80}, progress["shards"], rejects[:2])
    assert [[Reject(**r) for r in json.loads(line)["rejects"]] for line in path.read_text().splitlines()[1:]] == [
        rejects[:1], rejects[1:2]]
    assert writer.read_progress(tmp_path) == {**progress, "complete": False}
    assert writer.read_progress(tmp_path / "elsewhere") is None


def test_intact_prefix_stops_at_the_first_damaged_shard(tmp_path):
    entries = []
    w = writer.ShardWriter(tmp_path, samples_per_shard=1, max_bytes=None, on_shard=entries.append)
    for i in range(3):
        w.add(f"k{i}", members(f"k{i}"), seconds=1.0, truncated=False, position=i)
    assert writer.intact_prefix(tmp_path, entries) == entries
    data = bytearray((tmp_path / "001.tar").read_bytes())
    data[600] ^= 1
    (tmp_path / "001.tar").write_bytes(bytes(data))
    assert writer.intact_prefix(tmp_path, entries) == entries[:1]
    (tmp_path / "000.tar").unlink()
    assert writer.intact_prefix(tmp_path, entries) == []


def test_a_writer_needs_a_limit(tmp_path):
    with pytest.raises(ValueError, match="limit"):
        writer.ShardWriter(tmp_path, samples_per_shard=None, max_bytes=None)


def test_each_index_entry_sketches_its_shards_keys(tmp_path):
    """A shard's entry holds the 32 smallest 64-bit BLAKE2b hashes of its keys (FORMAT.md), hex, so a
    loader can estimate overlaps between sources from indexes alone; a resume rebuilds it from the
    progress log, and an entry logged before sketches existed still makes an index entry."""
    keys = [f"clip{i:03d}" for i in range(50)]
    entries = []
    w = writer.ShardWriter(tmp_path, samples_per_shard=40, max_bytes=None, on_shard=entries.append)
    for position, key in enumerate(keys):
        w.add(key, members(key), seconds=0.07, truncated=False, position=position)
    w.close(len(keys))

    def reference(shard_keys):
        return sorted(hashlib.blake2b(k.encode(), digest_size=8).hexdigest() for k in shard_keys)[:32]

    assert [e["key_sketch"] for e in entries] == [reference(keys[:40]), reference(keys[40:])]
    index = Index("train", 80, [writer.index_entry(e) for e in entries]).to_dict()
    assert [s["key_sketch"] for s in index["shards"]] == [e["key_sketch"] for e in entries]
    old = {k: v for k, v in entries[0].items() if k != "key_sketch"}
    assert writer.index_entry(old).key_sketch is None and "key_sketch" not in writer.index_entry(old).to_dict()
