"""The packer end to end, checked against the references: features against ``WhisperFeatureExtractor``
on ``librosa.load(path, sr=16000)``, shards read by plain ``webdataset``, ``tarfile`` and ``tar tf``,
``index.json`` against hashlib, rejects against the inputs that were made bad on purpose."""

import hashlib
import io
import os
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
import webdataset
from transformers import WhisperFeatureExtractor

from shard_tools import sources
from shard_tools.features import N_FRAMES, pad_mel
from shard_tools.layouts import LAYOUTS, Layout
from shard_tools.pack import LOCK_FILE, main
from shard_tools.shard_format import FORMAT_VERSION
from tests.conftest import write_audio

ROOT = Path(__file__).resolve().parent.parent
MIXED = [(".wav", 16000, 1), (".flac", 44100, 2), (".ogg", 22050, 1), (".mp3", 48000, 2), (".wav", 8000, 3)]


def make_clips(directory: Path, count: int, seconds: float = 0.3, caption_suffix: str = ".txt") -> list[Path]:
    """``count`` short clips cycling through the formats, rates and channel counts of MIXED."""
    paths = []
    for i in range(count):
        suffix, sr, channels = MIXED[i % len(MIXED)]
        path = write_audio(directory / f"clip{i:02d}{suffix}", seconds=seconds + 0.05 * i, sr=sr,
                           channels=channels, freq=200 + 50 * i, seed=i)
        if caption_suffix == ".txt":
            path.with_suffix(".txt").write_text(f"caption {i}\n")
        else:
            path.with_suffix(".json").write_text(json.dumps({"text": [f"caption {i}", f"other {i}"], "id": i}))
        paths.append(path)
    return paths


def read_split(directory: Path) -> list[dict]:
    """All samples of a split through plain ``webdataset.WebDataset``, decoded by hand (no pickle)."""
    index = json.loads((directory / "index.json").read_text())
    urls = [str(directory / shard["name"]) for shard in index["shards"]]
    samples = []
    for sample in webdataset.WebDataset(urls, shardshuffle=False):
        samples.append({"key": sample["__key__"], "meta": json.loads(sample["json"]),
                        "mel": np.load(io.BytesIO(sample["mel.npy"]), allow_pickle=False)})
    return samples


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every output file's bytes; the packers' lock files (which name their holder's pid) are not output."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def reference_features(path: Path, n_mels: int) -> np.ndarray:
    """The seed's features: librosa.load at 16 kHz, then the extractor on the 30-s padded clip."""
    audio, _ = librosa.load(str(path), sr=16000)
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    return extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]  # [n_mels, 3000]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_features_match_the_extractor_and_shards_read_with_plain_tools(tmp_path, n_mels):
    clips = make_clips(tmp_path / "ds" / "train", 5, caption_suffix=".json")
    dotted = write_audio(tmp_path / "ds" / "train" / "a.b.wav", seconds=0.4, sr=32000, freq=900)
    dotted.with_suffix(".txt").write_text("a dotted name")
    out = tmp_path / "out"
    assert main([str(tmp_path / "ds"), "--out", str(out), "--workers", "1", "--n-mels", str(n_mels),
                 "--samples-per-shard", "4"]) == 0
    split = out / "train"
    index = json.loads((split / "index.json").read_text())
    assert index["features"]["n_mels"] == n_mels and [s["name"] for s in index["shards"]] == ["000.tar", "001.tar"]
    for shard in index["shards"]:
        data = (split / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    samples = read_split(split)
    assert [s["samples"] for s in index["shards"]] == [4, 2] and index["totals"]["samples"] == len(samples) == 6
    by_source = {s["meta"]["source"]: s for s in samples}
    # The key of a.b.wav survives webdataset's split at the first dot.
    assert by_source["train/a.b.wav"]["key"].startswith("train_a_b-")
    for path in [*clips, dotted]:
        sample = by_source[f"train/{path.name}"]
        meta, mel = sample["meta"], sample["mel"]
        ref = reference_features(path, n_mels)
        assert mel.dtype == np.float16 and mel.shape[0] == n_mels and mel.shape[1] < N_FRAMES
        np.testing.assert_allclose(pad_mel(mel, meta["pad_value"]).astype(np.float32), ref, atol=2e-3)
        info = soundfile.info(str(path))
        assert meta["orig_sample_rate"] == info.samplerate and meta["truncated"] is False
        assert meta["seconds"] == pytest.approx(info.duration, abs=2e-3)
    assert by_source["train/clip01.flac"]["meta"]["captions"] == ["caption 1", "other 1"]
    assert by_source["train/clip01.flac"]["meta"]["extra"] == {"id": 1}
    assert index["totals"]["seconds"] == pytest.approx(sum(s["meta"]["seconds"] for s in samples), abs=1e-4)
    with tarfile.open(split / "000.tar") as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.mode == 0o444 and m.uname == "" for m in tar.getmembers())
    assert [n.split(".", 1)[1] for n in names] == ["mel.npy", "json"] * 4  # the two members, in that order
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "tf", str(split / "000.tar")], capture_output=True, text=True, check=True)
        assert listing.stdout.split() == names
    assert (split / "rejects.jsonl").read_text() == ""


def make_bad_dataset(root: Path) -> dict[str, str]:
    """Three good clips and one of each bad case; returns ``{path: expected reason start}``."""
    make_clips(root, 3)
    write_audio(root / "nocaption.wav", seconds=0.3)
    (root / "orphan.txt").write_text("no audio for this caption")
    write_audio(root / "blank.flac", seconds=0.3)
    (root / "blank.txt").write_text("   \n")
    write_audio(root / "nofield.wav", seconds=0.3)
    (root / "nofield.json").write_text(json.dumps({"caption": "not in the text field"}))
    (root / "corrupt.mp3").write_bytes(b"\xff\xfb garbage, not an mp3 frame" * 10)
    (root / "corrupt.txt").write_text("a corrupt file")
    soundfile.write(str(root / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    (root / "empty.txt").write_text("zero samples")
    soundfile.write(str(root / "silent.wav"), np.zeros(8000, dtype=np.float32), 16000)
    (root / "silent.txt").write_text("all zeros")
    return {"nocaption.wav": "audio without caption", "orphan.txt": "caption without audio",
            "blank.flac": "blank.txt: empty caption", "nofield.wav": "nofield.json: no caption field 'text'",
            "corrupt.mp3": "cannot decode audio", "empty.wav": "zero-length audio",
            "silent.wav": "silent audio"}


def test_bad_inputs_go_to_rejects_and_the_exit_status_follows_the_fraction(tmp_path, capsys):
    expected = make_bad_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    status = main([str(tmp_path / "ds"), "--out", str(out), "--workers", "2"])
    assert status == 1  # 7 of 10 rejected, above the default 0.1
    err = capsys.readouterr().err
    assert "7 of 10 inputs (70.0%) were rejected" in err and str(out / "rejects.jsonl") in err
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rejects) == sorted(expected)
    for r in rejects:
        assert r["reason"].startswith(expected[r["path"]]), r
    samples = read_split(out)  # the good clips are packed all the same
    assert sorted(s["meta"]["source"] for s in samples) == ["clip00.wav", "clip01.flac", "clip02.ogg"]
    index = json.loads((out / "index.json").read_text())
    assert index["split"] == "" and index["totals"]["rejected"] == 7 and index["totals"]["samples"] == 3
    assert main([str(tmp_path / "ds"), "--out", str(out), "--max-reject-fraction", "0.7", "--overwrite",
                 "--workers", "1"]) == 0
    assert "error" not in capsys.readouterr().err


def test_shards_are_byte_identical_for_any_worker_count_and_run(tmp_path):
    for split in ("train", "validation"):
        make_clips(tmp_path / "ds" / split, 11 if split == "train" else 4)
    (tmp_path / "ds" / "train" / "stray.txt").write_text("caption without audio")
    (tmp_path / "ds" / "nothing_good").mkdir()
    (tmp_path / "ds" / "nothing_good" / "stray.json").write_text("{}")
    runs = []
    for name, workers in (("w1", 1), ("w2", 2), ("w2again", 2)):
        assert main([str(tmp_path / "ds"), "--out", str(tmp_path / name), "--workers", str(workers),
                     "--samples-per-shard", "3", "--max-reject-fraction", "0.2"]) == 0  # 2 of 17 rejected
        runs.append(tree_bytes(tmp_path / name))
    assert runs[0] == runs[1] == runs[2]
    assert json.loads(runs[0]["nothing_good/index.json"])["totals"] == {
        "shards": 0, "samples": 0, "seconds": 0, "bytes": 0, "truncated": 0, "rejected": 1}
    assert sorted(k for k in runs[0] if k.endswith(".tar")) == [
        "train/000.tar", "train/001.tar", "train/002.tar", "train/003.tar", "validation/000.tar", "validation/001.tar"]
    # Rolling by size instead: every shard stays under the limit.
    assert main([str(tmp_path / "ds"), "--out", str(tmp_path / "mb"), "--workers", "1", "--samples-per-shard", "0",
                 "--max-shard-mb", "0.1", "--split", "train"]) == 0
    index = json.loads((tmp_path / "mb" / "train" / "index.json").read_text())
    assert index["totals"]["samples"] == 11 and len(index["shards"]) > 1
    assert all(s["bytes"] <= 100_000 for s in index["shards"])


def test_parts_are_disjoint_cover_the_dataset_and_merge_their_indexes(tmp_path):
    make_clips(tmp_path / "ds" / "train", 10)
    assert main([str(tmp_path / "ds"), "--out", str(tmp_path / "whole"), "--workers", "1"]) == 0
    whole = {s["key"]: s for s in read_split(tmp_path / "whole" / "train")}
    out = tmp_path / "parts"
    keys = []
    for part in range(3):
        assert not (out / "train" / "index.json").exists()  # merged only once every part is done
        assert main([str(tmp_path / "ds"), "--out", str(out), "--workers", "1", "--part", str(part),
                     "--num-parts", "3", "--samples-per-shard", "2"]) == 0
        keys.append([s["key"] for s in read_split(out / "train" / f"part-{part}-of-3")])
    assert [len(k) for k in keys] == [3, 3, 4]
    assert sum(keys, []) == sorted(whole)  # disjoint, covering, in the single run's order
    merged = json.loads((out / "train" / "index.json").read_text())
    assert merged["totals"]["samples"] == 10 and merged["shards"][0]["name"] == "part-0-of-3/000.tar"
    for shard in merged["shards"]:
        assert hashlib.sha256((out / "train" / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    merged_samples = read_split(out / "train")
    for sample in merged_samples:  # same features as the single run
        np.testing.assert_array_equal(sample["mel"], whole[sample["key"]]["mel"])
        assert sample["meta"] == whole[sample["key"]]["meta"]


def test_resume_keeps_complete_shards_and_gives_the_same_bytes(tmp_path, capsys):
    make_clips(tmp_path / "ds", 9)
    (tmp_path / "ds" / "orphan.txt").write_text("x")
    args = [str(tmp_path / "ds"), "--workers", "1", "--samples-per-shard", "2"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    reference = tree_bytes(tmp_path / "ref")
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "ref", out)
    # A killed run: no index.json yet, the last shard not renamed into place, a half-written .tmp.
    (out / "index.json").unlink()
    (out / "004.tar").unlink()
    (out / "004.tar.tmp").write_bytes(b"half a shard")
    (out / "notes.tmp").write_text("a user's file, not ours")
    assert main([*args, "--out", str(out)]) == 2  # refuses to mix runs without --resume
    assert "--resume" in capsys.readouterr().err
    kept = (out / "000.tar").stat().st_mtime_ns
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert (out / "000.tar").stat().st_mtime_ns == kept  # complete shards are kept, not rewritten
    assert not (out / "004.tar.tmp").exists()  # our debris is cleared, other files are left alone
    (out / "notes.tmp").unlink()
    assert tree_bytes(out) == reference
    # A damaged shard in the middle: it and everything after it are packed again.
    with open(out / "001.tar", "r+b") as f:
        f.seek(700)
        f.write(b"\x00\x01")
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert tree_bytes(out) == reference
    # Resuming with other settings is refused with the reason.
    assert main([*args[:-1], "3", "--out", str(out), "--resume"]) == 2
    assert "samples_per_shard" in capsys.readouterr().err


def test_kill_then_resume_through_the_command_line(tmp_path):
    make_clips(tmp_path / "ds", 40, seconds=2.0)
    args = [str(tmp_path / "ds"), "--workers", "1", "--samples-per-shard", "1"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "shard_tools.pack", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "001.tar").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists(), "the packer finished before it could be killed"
    done = subprocess.run([sys.executable, "-m", "shard_tools.pack", *args, "--out", str(out), "--resume"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "total: 40 clips" in done.stdout and "rejected 0" in done.stdout
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_clips_over_30_seconds_are_truncated_and_counted(tmp_path, capsys):
    long_clip = write_audio(tmp_path / "ds" / "long.flac", seconds=31.0, sr=22050, freq=300)
    long_clip.with_suffix(".txt").write_text("a long hum")
    write_audio(tmp_path / "ds" / "short.wav", seconds=0.5).with_suffix(".txt").write_text("short")
    assert main([str(tmp_path / "ds"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert "truncated 1" in capsys.readouterr().out
    samples = {s["meta"]["source"]: s for s in read_split(tmp_path / "out")}
    meta, mel = samples["long.flac"]["meta"], samples["long.flac"]["mel"]
    assert meta["truncated"] is True and meta["seconds"] == pytest.approx(31.0, abs=1e-3)
    assert mel.shape == (80, N_FRAMES)
    np.testing.assert_allclose(pad_mel(mel, meta["pad_value"]).astype(np.float32),
                               reference_features(long_clip, 80), atol=2e-3)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["totals"]["truncated"] == 1 and samples["short.wav"]["meta"]["truncated"] is False


def test_audio_from_other_encoders_packs_without_a_reject(tmp_path, encoded_clips, capsys):
    for name, path in encoded_clips.items():  # sox's LAME MP3s were all rejected as truncated
        (tmp_path / "ds").mkdir(exist_ok=True)
        shutil.copyfile(path, tmp_path / "ds" / name)
        (tmp_path / "ds" / name).with_suffix(".txt").write_text(f"a voice, {name}")
    assert main([str(tmp_path / "ds"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert (tmp_path / "out" / "rejects.jsonl").read_text() == ""
    samples = {s["meta"]["source"]: s["meta"] for s in read_split(tmp_path / "out")}
    assert sorted(samples) == sorted(encoded_clips)
    for name, meta in samples.items():  # the decoded length, not a header's estimate (34.22 s for 34.06)
        whole, orig_sr = librosa.load(str(encoded_clips[name]), sr=None)
        assert meta["orig_sample_rate"] == orig_sr
        assert meta["seconds"] == pytest.approx(len(whole) / orig_sr, abs=1 / 16000)
        assert meta["truncated"] == (len(whole) > 30 * orig_sr)
    assert "truncated 1" in capsys.readouterr().out


def test_manifest_and_raw_audio_shards_end_to_end(tmp_path):
    clips = make_clips(tmp_path / "audio", 3)
    manifest = tmp_path / "captions.csv"
    manifest.write_text("file,caption,speaker\n" + "".join(
        f"audio/{p.name},caption {i},s{i}\n" for i, p in enumerate(clips)) + "audio/missing.wav,gone,s9\n")
    out = tmp_path / "out"
    assert main(["--manifest", str(manifest), "--audio-field", "file", "--caption-field", "caption", "--out",
                 str(out), "--split", "train", "--workers", "1", "--max-reject-fraction", "0.5"]) == 0
    samples = read_split(out / "train")
    assert [(s["meta"]["source"], s["meta"]["captions"], s["meta"]["extra"]) for s in samples] == [
        (f"audio/{p.name}", [f"caption {i}"], {"speaker": f"s{i}"}) for i, p in enumerate(clips)]
    assert json.loads((out / "train" / "rejects.jsonl").read_text())["path"] == "audio/missing.wav"
    # The same clips as raw-audio shards in the emo_webds layout (KEY.flac + KEY.json).
    raw = tmp_path / "raw"
    raw.mkdir()
    for s in range(2):
        with tarfile.open(raw / f"{s:03d}.tar", "w") as tar:
            for i, clip in enumerate(clips[s:s + 2]):
                audio, sr = soundfile.read(str(clip))
                buf = io.BytesIO()
                soundfile.write(buf, audio, sr, format="FLAC")
                for ext, data in (("flac", buf.getvalue()), ("json", json.dumps({"text": f"raw {s}{i}"}).encode())):
                    info = tarfile.TarInfo(f"s{s}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    assert main(["--from-shards", str(raw / "{000..001}.tar"), "--audio-field", "flac", "--caption-field",
                 "json.text", "--out", str(tmp_path / "from_raw"), "--workers", "2", "--n-mels", "128"]) == 0
    samples = read_split(tmp_path / "from_raw")
    assert [s["meta"]["source"] for s in samples] == [f"{raw / '000.tar'}#s0_0.flac", f"{raw / '000.tar'}#s0_1.flac",
                                                      f"{raw / '001.tar'}#s1_0.flac", f"{raw / '001.tar'}#s1_1.flac"]
    assert [s["meta"]["captions"] for s in samples] == [["raw 00"], ["raw 01"], ["raw 10"], ["raw 11"]]
    assert all(s["mel"].shape[0] == 128 for s in samples)


def test_usage_errors_exit_with_status_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out")]) == 2
    assert "exactly one input" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path), "--part", "2", "--num-parts", "2"]) == 2
    try:
        import datasets  # noqa: F401
    except ImportError:  # the optional extra is missing: a clear message, not a traceback
        assert main(["--hf-dataset", "some/name", "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
        assert "pip install 'whisper-caption-stream[hf]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--n-mels", "64"])


# ---------------------------------------------------------------------------- hostile inputs

def make_hostile_dataset(root: Path) -> dict[str, str]:
    """Two good clips, a hidden one and a BOM caption (both packed), and one input of each hostile
    class; returns ``{path: expected reason fragment}`` for the rejects."""
    make_clips(root, 2)
    write_audio(root / ".hidden.wav", seconds=0.3, freq=700)
    (root / ".hidden.txt").write_text("a hidden clip")
    write_audio(root / "bom.wav", seconds=0.3, freq=900)
    (root / "bom.txt").write_bytes("\ufeffa caption after a byte-order mark\n".encode("utf-8"))
    write_audio(root / "surrogate.wav", seconds=0.3)
    (root / "surrogate.json").write_text('{"text": "bad \\ud800"}')  # a lone surrogate, as JSON writes it
    write_audio(root / "deep.wav", seconds=0.3)
    (root / "deep.json").write_text('{"text": "x", "meta": ' + "[" * 50000 + "]" * 50000 + "}")
    cut = write_audio(root / "cut.wav", seconds=1.0)
    cut.write_bytes(cut.read_bytes()[:44 + 8000])  # the header still promises 1 s
    (root / "cut.txt").write_text("cut short")
    soundfile.write(str(root / "loud.wav"), np.full(16000, 1e19, np.float32), 16000, subtype="FLOAT")
    (root / "loud.txt").write_text("finite but huge samples")
    os.mkfifo(root / "fifo.wav")
    (root / "fifo.txt").write_text("a pipe, not a file")
    write_audio(root / "locked" / "inside.wav", seconds=0.3)
    (root / "locked" / "inside.txt").write_text("in a folder that cannot be listed")
    return {"surrogate.wav": "lone surrogate", "deep.wav": "nests deeper", "cut.wav": "truncated audio",
            "loud.wav": "log-mel is not finite", "fifo.wav": "not a regular file", "locked/": "cannot read folder"}


@pytest.mark.timeout(300)  # a FIFO read would block forever
def test_hostile_inputs_cost_only_themselves(tmp_path, monkeypatch, capsys):
    expected = make_hostile_dataset(tmp_path / "ds")
    real_scandir = os.scandir

    def scandir(path="."):  # root reads any folder, so an unreadable one is simulated
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert main([str(tmp_path / "ds"), "--out", str(out), "--workers", "1", "--max-reject-fraction", "1"]) == 0
    rejects = {r["path"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert sorted(rejects) == sorted(expected)
    for path, fragment in expected.items():
        assert fragment in rejects[path], (path, rejects[path])
    samples = {s["meta"]["source"]: s for s in read_split(out)}
    assert sorted(samples) == [".hidden.wav", "bom.wav", "clip00.wav", "clip01.flac"]
    assert samples["bom.wav"]["meta"]["captions"] == ["a caption after a byte-order mark"]
    assert "Traceback" not in capsys.readouterr().err


def test_only_the_kept_window_is_decoded(tmp_path):
    import tracemalloc

    from shard_tools.features import decode_audio

    path = write_audio(tmp_path / "long.wav", seconds=120.0, sr=48000, channels=2)  # 46 MB as float32
    tracemalloc.start()
    decoded = decode_audio(str(path), max_seconds=30)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert decoded.seconds == 120.0 and len(decoded.audio) == 30 * 16000 + 1  # one more: marked truncated
    assert peak < 25e6, peak  # the whole file decoded would take 2 x 46 MB
    whole, _ = librosa.load(str(path), sr=16000)  # the reference decodes everything
    np.testing.assert_allclose(decoded.audio[:16000 * 29], whole[:16000 * 29], atol=1e-5)


def test_resume_after_fixing_a_reject_packs_it_and_matches_a_fresh_run(tmp_path):
    ds = tmp_path / "ds"
    make_clips(ds, 4)
    good = (ds / "clip01.flac").read_bytes()
    (ds / "clip01.flac").write_bytes(b"not audio at all" * 20)
    out = tmp_path / "out"
    args = ["--workers", "1", "--samples-per-shard", "2", "--max-reject-fraction", "1"]
    assert main([str(ds), "--out", str(out), *args]) == 0
    assert "clip01.flac" in (out / "rejects.jsonl").read_text()
    (ds / "clip01.flac").write_bytes(good)  # fixed, as docs/troubleshooting.md tells the user to
    assert main([str(ds), "--out", str(out), "--resume", *args]) == 0
    assert (out / "rejects.jsonl").read_text() == ""
    assert sorted(s["meta"]["source"] for s in read_split(out)) == [
        "clip00.wav", "clip01.flac", "clip02.ogg", "clip03.mp3"]
    assert main([str(ds), "--out", str(tmp_path / "fresh"), *args]) == 0
    assert tree_bytes(out) == tree_bytes(tmp_path / "fresh")


def test_outputs_honour_the_umask_and_bad_outputs_are_one_line(tmp_path, capsys, monkeypatch):
    from shard_tools.fileio import hold_lock
    from shard_tools import writer

    make_clips(tmp_path / "ds", 2)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main([str(tmp_path / "ds"), "--out", str(out), "--workers", "1"]) == 0
    finally:
        os.umask(old)
    for name in ("index.json", "rejects.jsonl", "000.tar"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    assert main([str(tmp_path / "ds"), "--out", str(tmp_path / "file"), "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'file'} is a file, not a folder"
    with hold_lock(out / ".lock"):  # another packer at work on this split
        assert main([str(tmp_path / "ds"), "--out", str(out), "--resume", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "being written by another packer" in err and len(err.strip().splitlines()) == 1

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.ShardWriter, "_write", full_disk)
    assert main([str(tmp_path / "ds"), "--out", str(tmp_path / "full"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: cannot write {tmp_path / 'full'}: No space left on device"
    assert not list((tmp_path / "full").glob("*.tmp"))


def test_resume_with_another_caption_field_is_refused_before_anything_is_touched(tmp_path, capsys):
    for split in ("train", "validation"):
        make_clips(tmp_path / "ds" / split, 3, caption_suffix=".json")
    out = tmp_path / "out"
    args = [str(tmp_path / "ds"), "--out", str(out), "--workers", "1", "--samples-per-shard", "2"]
    assert main(args) == 0
    before = tree_bytes(out)
    capsys.readouterr()
    assert main([*args, "--resume", "--caption-field", "nope"]) == 2  # a typo must not repack (and remove) shards
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "caption_fields differ" in err and "--overwrite" in err
    assert tree_bytes(out) == before
    args[0] += "/"  # the same folder, as tab completion spells it
    assert main([*args, "--resume", "--caption-field", "text"]) == 0  # unchanged options: every shard kept
    assert "6 clips (6 kept from an earlier run)" in capsys.readouterr().out
    assert tree_bytes(out) == before


def test_hostile_manifest_rows_cost_only_themselves_and_are_counted(tmp_path, capsys):
    clips = make_clips(tmp_path / "audio", 2)
    manifest = tmp_path / "m.jsonl"
    rows = [["audio/clip00.wav", "an array"], {"audio_file": "audio/\0.wav", "caption_text": "a NUL byte"},
            *({"audio_file": f"audio/{p.name}", "caption_text": f"caption {i}"} for i, p in enumerate(clips)),
            {"audio_file": "audio/clip00.wav", "caption_text": "caption 0"}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    assert main(["--manifest", str(manifest), "--out", str(out), "--workers", "1", "--max-reject-fraction", "1"]) == 0
    captured = capsys.readouterr()
    total = captured.out.splitlines()[-1]
    assert total.startswith("total: 2 clips,") and total.endswith("rejected 2, repeats 1")
    assert "note: m.jsonl:5: repeats m.jsonl:3: the same audio file with no new caption (not a rejected input)" \
        in captured.err.splitlines()
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["path"], r["reason"]) for r in rejects] == [
        ("m.jsonl:1", "JSON line is not an object"), ("m.jsonl:2", "audio field 'audio_file' holds a NUL byte")]
    index = json.loads((out / "index.json").read_text())
    assert index["totals"]["samples"] == 2 and index["totals"]["rejected"] == 2
    assert [s["meta"]["captions"] for s in read_split(out)] == [["caption 0"], ["caption 1"]]


def test_symlinked_folders_and_second_caption_files_are_packed_or_reported(tmp_path, capsys):
    root = tmp_path / "ds" / "train"
    make_clips(root, 1)
    (root / "clip00.json").write_text(json.dumps({"text": "from the json"}))  # beside clip00.txt
    make_clips(tmp_path / "elsewhere", 2)
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "loop").symlink_to(root)
    (root / "same.wav").symlink_to(root / "clip00.wav")  # a second path to a clip, no new caption
    (root / "same.txt").write_text("caption 0")
    out = tmp_path / "out"
    args = [str(tmp_path / "ds"), "--out", str(out), "--workers", "1"]
    assert main(args) == 0  # every clip packed: the repeats lost nothing, so they are not rejected inputs
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1].endswith("rejected 0, repeats 2")
    assert [line for line in captured.err.splitlines() if line.startswith("note:")] == [
        "note: train/linked/loop/: same folder as train/ (a symlink loop or a second path to it): read once "
        "(not a rejected input)",
        "note: train/same.wav: same audio file as train/clip00.wav (a symlink or a second path to it) with no new "
        "caption: packed once (not a rejected input)"]
    assert {s["meta"]["source"]: s["meta"]["captions"] for s in read_split(out / "train")} == {
        "train/clip00.wav": ["from the json", "caption 0"], "train/linked/clip00.wav": ["caption 0"],
        "train/linked/clip01.flac": ["caption 1"]}
    assert (out / "train" / "rejects.jsonl").read_text() == ""
    before = tree_bytes(out)
    assert main([*args, "--resume"]) == 0 and tree_bytes(out) == before


def test_refused_resume_of_a_part_keeps_the_merged_index(tmp_path, capsys):
    make_clips(tmp_path / "ds" / "train", 2)
    out = tmp_path / "out"
    args = [str(tmp_path / "ds"), "--out", str(out), "--workers", "1", "--num-parts", "2"]
    for part in ("0", "1"):
        assert main([*args, "--part", part]) == 0
    before = tree_bytes(out)
    assert (out / "train" / "index.json").is_file()  # merged from both parts
    assert main([*args, "--part", "0", "--resume", "--caption-field", "nope"]) == 2
    assert "caption_fields differ" in capsys.readouterr().err and tree_bytes(out) == before


def test_the_out_folder_inside_the_dataset_is_never_an_input(tmp_path, capsys):
    for split in ("train", "validation"):
        make_clips(tmp_path / "ds" / split, 3)
    out = tmp_path / "ds" / "packed"  # beside the splits: not a split of its own
    args = [str(tmp_path / "ds"), "--out", str(out), "--workers", "1", "--samples-per-shard", "2"]
    assert main(args) == 0
    fresh = tree_bytes(out)
    assert sorted(fresh) == sorted(f"{s}/{n}" for s in ("train", "validation")
                                   for n in ("000.tar", "001.tar", ".progress.jsonl", "index.json", "rejects.jsonl"))
    capsys.readouterr()
    (out / "train" / "001.tar").unlink()  # an interrupted run: the resume repacks beside its own output
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"note: {out} is skipped when listing the inputs: it is the --out folder" in err.splitlines()
    assert "rejected" not in err and tree_bytes(out) == fresh
    flat = tmp_path / "ds" / "train"  # a flat folder whose output sits inside it
    flat_args = [str(flat), "--out", str(flat / "packed"), "--workers", "1", "--samples-per-shard", "2"]
    assert main(flat_args) == 0
    flat_fresh = tree_bytes(flat / "packed")
    assert main([*flat_args, "--overwrite"]) == 0 and tree_bytes(flat / "packed") == flat_fresh
    assert main([*flat_args, "--resume"]) == 0 and tree_bytes(flat / "packed") == flat_fresh
    assert json.loads(flat_fresh["index.json"])["totals"]["rejected"] == 0
    capsys.readouterr()
    for dataset in (tmp_path / "ds", flat):  # written among the inputs: refused before anything is written
        before = tree_bytes(tmp_path / "ds")
        assert main([str(dataset), "--out", str(dataset), "--workers", "1"]) == 2
        # the earlier outputs inside it are noted as skipped
        err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:"))
        assert len(err.splitlines()) == 1 and err.startswith(f"error: --out {dataset}: ") and "read by the next run" in err
        assert tree_bytes(tmp_path / "ds") == before


def test_an_output_folder_holding_the_input_shards_is_refused(tmp_path, capsys, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "000.tar", "w") as tar:
        data = b'{"text": "a"}'
        info = tarfile.TarInfo("s0.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    before = (raw / "000.tar").read_bytes()
    monkeypatch.chdir(tmp_path)
    for flag in ([], ["--resume"], ["--overwrite"]):  # each would lose raw/000.tar or leave a lock
        assert main(["--from-shards", "raw/*.tar", "--out", "raw", "--workers", "1", *flag]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert err.startswith("error: --out raw: the input shard raw/000.tar lies in raw, a folder this run writes")
        assert (raw / "000.tar").read_bytes() == before and sorted(os.listdir(raw)) == ["000.tar"]


def test_an_earlier_pack_output_inside_the_dataset_is_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_clips(tmp_path / "cF", 2)  # a flat folder
    make_clips(tmp_path / "ds" / "train", 2)  # split folders
    for dataset in ("cF", "ds"):
        assert main([dataset, "--out", f"{dataset}/packed", "--workers", "1"]) == 0
        capsys.readouterr()
        assert main([dataset, "--out", f"{dataset}/packed2", "--workers", "1"]) == 0
        captured = capsys.readouterr()
        assert f"note: {dataset}/packed is skipped: it holds packed shards (index.json), not inputs" in \
            captured.err.splitlines()
        assert captured.out.splitlines()[-1].endswith("rejected 0, repeats 0")
        assert not (tmp_path / dataset / "packed2" / "packed").exists()
    assert [s["meta"]["source"] for s in read_split(tmp_path / "cF" / "packed2")] == ["clip00.wav", "clip01.flac"]
    assert sorted(os.listdir(tmp_path / "ds" / "packed2")) == ["train"]


# ---------------------------------------------------------------------------- the layout table and settings

def test_a_layout_added_to_the_table_is_an_input_option_with_its_defaults(tmp_path, monkeypatch, capsys):
    clip = write_audio(tmp_path / "a.wav", seconds=0.3)
    specs = []

    def read(spec: sources.InputSpec) -> list[sources.SplitInput]:
        specs.append(spec)
        item = sources.Item("a.wav", spec.split or "", str(clip), [f"said by {spec.location}"], {}, "a.wav")
        return [sources.listed(spec.split or "", [item], spec.part, spec.num_parts)]

    monkeypatch.setitem(LAYOUTS, "lines", Layout("lines", "--from-lines", "FILE", "one clip per line", read,
                                                 "line", "clip", "its column"))
    monkeypatch.setenv("COLUMNS", "1000")  # help lines unwrapped
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--from-lines FILE one clip per line" in help_text and "--from-lines: line" in help_text
    assert "--from-lines: its column (default: clip)" in help_text
    out = tmp_path / "out"
    assert main(["--from-lines", "list.txt", "--out", str(out), "--workers", "1"]) == 0
    assert specs == [sources.InputSpec("list.txt", ("line",), "clip")]
    assert [s["meta"]["captions"] for s in read_split(out)] == [["said by list.txt"]]
    settings = json.loads((out / ".progress.jsonl").read_text().splitlines()[0])["settings"]
    assert settings["layout"] == "lines" and settings["input"] == "list.txt"
    assert main(["--from-lines", "x", str(tmp_path), "--out", str(out)]) == 2
    assert "exactly one input: DATASET, --manifest, --from-shards, --hf-dataset or --from-lines" in \
        capsys.readouterr().err


def test_the_resume_record_holds_what_earlier_outputs_hold(tmp_path):
    """The settings line of ``.progress.jsonl``, as outputs packed before the settings were typed
    hold it: a resume of them is checked against the same keys and values."""
    make_clips(tmp_path / "ds", 1)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_file": "ds/clip00.wav", "caption_text": "x"}) + "\n")
    runs = {"folder": [str(tmp_path / "ds" / "."), "--caption-field", "text"],
            "manifest": ["--manifest", str(manifest), "--split", "train", "--part", "1", "--num-parts", "2",
                         "--max-shard-mb", "5", "--n-mels", "128"]}
    expected = {
        "folder": {"layout": "folder", "input": str(tmp_path / "ds"), "audio_field": None, "caption_fields": ["text"],
                   "split": "", "n_mels": 80, "samples_per_shard": 1000, "max_shard_mb": None, "part": 0,
                   "num_parts": 1, "format_version": FORMAT_VERSION},
        "manifest": {"layout": "manifest", "input": str(manifest), "audio_field": "audio_file",
                     "caption_fields": ["caption_text"], "split": "train", "n_mels": 128, "samples_per_shard": 1000,
                     "max_shard_mb": 5.0, "part": 1, "num_parts": 2, "format_version": FORMAT_VERSION}}
    for name, args in runs.items():
        out = tmp_path / name
        assert main([*args, "--out", str(out), "--workers", "1"]) == 0
        progress = next(out.rglob(".progress.jsonl"))
        assert json.loads(progress.read_text().splitlines()[0]) == {"settings": expected[name]}
        assert main([*args, "--out", str(out), "--workers", "1", "--resume"]) == 0


def test_workers_that_cannot_start_stop_the_packer_with_the_reason(tmp_path):
    """A feature library that fails to import in the workers is one line and exit 2, with any number
    of workers (``Pool`` would otherwise replace a failing worker without end: a hang)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import sys\n\n"
        "class _Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'soxr':\n"
        "            raise ImportError('soxr is broken here')\n\n"
        "sys.meta_path.insert(0, _Broken())\n")
    write_audio(tmp_path / "clips" / "train" / "a.wav", seconds=0.5)
    (tmp_path / "clips" / "train" / "a.txt").write_text("a tone")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    for workers, reason in [("2", "a packing worker could not start (ImportError: soxr is broken here)"),
                            ("1", "cannot compute features: ImportError: soxr is broken here")]:
        done = subprocess.run([sys.executable, "-m", "shard_tools.pack", str(tmp_path / "clips"), "--out",
                               str(tmp_path / f"out{workers}"), "--workers", workers], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and reason in done.stderr and "Traceback" not in done.stderr, done.stderr
