"""Raw-audio shard and Hugging Face readers: what each yields for good and bad inputs, checked
against hand-written expectations (hashlib for keys, plain tarfile for raw shards, webdataset's own
key split)."""

import io
import json
import tarfile

import pytest

from shard_tools.shard_format import Reject
from shard_tools.source_shards import hf_inputs, hf_row_item, shard_inputs
from tests.conftest import write_audio
from tests.test_sources import sha10, spec


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_raw_shards(tmp_path, per_shard=3):
    """Two raw-audio shards in the emo_webds layout: KEY.flac + KEY.json ({"text": …, "emotion": …})."""
    urls = []
    for s in range(2):
        url = tmp_path / "raw" / f"{s:03d}.tar"
        url.parent.mkdir(exist_ok=True)
        with tarfile.open(url, "w") as tar:
            for i in range(per_shard):
                key = f"v1.0/clip{s}_{i}"  # webdataset splits at the first dot of the base name only
                audio = write_audio(tmp_path / "tmp.flac", seconds=0.2, seed=i).read_bytes()
                add_member(tar, f"{key}.flac", audio)
                add_member(tar, f"{key}.json", json.dumps({"text": f"caption {s} {i}", "emotion": "calm"}).encode())
        urls.append(url)
    return urls


def test_raw_audio_shards(tmp_path):
    urls = write_raw_shards(tmp_path)
    with tarfile.open(urls[1], "a") as tar:  # a sample without audio, one without its caption field
        add_member(tar, "noaudio.json", b'{"text": "x"}')
        add_member(tar, "nocap.flac", (tmp_path / "tmp.flac").read_bytes())
        add_member(tar, "nocap.json", b'{"label": 3}')
    (tmp_path / "raw" / "002.tar").write_bytes(b"not a tar file at all" * 40)
    pattern = str(tmp_path / "raw" / "{000..002}.tar")
    (split,) = shard_inputs(spec(pattern, ["json.text"], "flac"))
    assert split.name == "" and split.total is None
    items = list(split.items())
    good = [i for i in items if not isinstance(i, Reject)]
    assert len(good) == 6
    first = good[0]
    assert first.source == f"{urls[0]}#v1.0/clip0_0.flac"
    assert "." not in first.key and first.key.endswith("_v1_0_clip0_0-" + sha10(first.source))
    assert first.captions == ["caption 0 0"] and first.extra == {"emotion": "calm"}
    with tarfile.open(urls[0]) as tar:
        assert first.audio == tar.extractfile("v1.0/clip0_0.flac").read()
    reasons = [i.reason for i in items if isinstance(i, Reject)]
    assert reasons[0].startswith("sample has no audio member") and reasons[1] == "no caption field 'json.text'"
    assert reasons[2].startswith("cannot read shard after 0 samples")
    # Default audio field: the first audio member; the parts split the shard list.
    part0, part1 = (shard_inputs(spec(f"{urls[0]} {urls[1]}", ["json.text"], part=p, num_parts=2))[0] for p in range(2))
    sources0 = [i.source for i in part0.items()]
    sources1 = [i.source for i in part1.items()]
    assert all(s.startswith(str(urls[0])) for s in sources0) and all(s.startswith(str(urls[1])) for s in sources1)


def test_raw_shard_keys_differ_when_webdataset_keys_collide(tmp_path):
    url = tmp_path / "dup.tar"
    audio = write_audio(tmp_path / "a.wav", seconds=0.2).read_bytes()
    with tarfile.open(url, "w") as tar:  # key "a" twice, apart: two samples with one source
        for key, caption in (("a", b"first"), ("b", b"between"), ("a", b"again")):
            add_member(tar, f"{key}.wav", audio)
            add_member(tar, f"{key}.txt", caption)
    (split,) = shard_inputs(spec(url, ["txt"]))
    first, between, second = split.items()
    assert first.captions == ["first"] and between.captions == ["between"]
    assert second.reason.startswith("duplicate key")
    with pytest.raises(ValueError, match="more than once"):  # the loader's grammar: never read a shard twice
        shard_inputs(spec(f"{url} {tmp_path}/./dup.tar", ["txt"]))


def test_hf_dataset_from_a_local_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = [str(write_audio(tmp_path / f"{i}.wav", seconds=0.2, seed=i)) for i in range(3)]
    table = datasets.Dataset.from_dict({"audio": paths, "caption": ["a", "b", ""], "n": [1, 2, 3]})
    table = table.cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "hf"))
    (split,) = hf_inputs(spec(tmp_path / "hf", ["caption"], "audio"))
    items = list(split.items())
    assert split.name == "train" and [i.source for i in items] == ["train/00000000", "train/00000001",
                                                                       "train/00000002"]
    assert items[0].captions == ["a"] and items[0].extra == {"n": 1}
    assert isinstance(items[0].audio, (bytes, str))
    assert items[2].reason == "empty caption"


def test_hf_row_with_a_nul_byte_in_its_audio_path_is_a_reject():
    row = {"audio": {"bytes": None, "path": "clips/a\0.wav"}, "text": "x"}
    item = hf_row_item(row, "train/00000000", "train", "audio", ["text"])
    assert item.reason == "audio path in column 'audio' holds a NUL byte"
