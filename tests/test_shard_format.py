"""The shard contract against the references: numpy's own .npy reader, json, plain webdataset."""

import dataclasses
import io
import json
import re
import tarfile

import numpy as np
import pytest
import webdataset

from shard_tools.shard_format import (FORMAT_VERSION, MAX_JSON_DEPTH, READABLE_VERSIONS, Index, IndexEntry,
                                      SampleError, SampleMeta, decode_sample, encode_sample, load_json, parse_index)


def meta(**changes) -> SampleMeta:
    return SampleMeta(**{"captions": ["a dog barks"], "source": "a.wav", "seconds": 1.0, "orig_sample_rate": 16000,
                         "pad_value": -0.5, **changes})


def test_encoded_sample_reads_back_with_plain_webdataset(tmp_path):
    mel = np.linspace(-1, 1, 80 * 9, dtype=np.float32).reshape(80, 9)
    members = encode_sample("k-0123456789", mel, meta(extra={"id": 3}))
    with tarfile.open(tmp_path / "000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = webdataset.WebDataset(str(tmp_path / "000.tar"), shardshuffle=False)
    assert json.loads(sample["json"]) == {"captions": ["a dog barks"], "source": "a.wav", "seconds": 1.0,
                                          "orig_sample_rate": 16000, "pad_value": -0.5, "truncated": False,
                                          "extra": {"id": 3}}
    np.testing.assert_array_equal(np.load(io.BytesIO(sample["mel.npy"]), allow_pickle=False), mel.astype(np.float16))
    decoded = decode_sample({"__key__": "k", "__url__": "u", "mel.npy": sample["mel.npy"], "json": sample["json"]})
    assert decoded["mel"].dtype == np.float16 and decoded["json"]["captions"] == ["a dog barks"]


@pytest.mark.parametrize("shape", [(80, 1), (80, 9), (128, 3000), (80, 601)])
def test_mel_member_is_what_np_save_writes(shape):
    mel = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, mel, allow_pickle=False)
    for _ in range(2):  # the header is cached per shape
        assert encode_sample("k", mel, meta())[0] == ("k.mel.npy", buf.getvalue())
    fortran = np.asfortranarray(mel)  # stored C-ordered whatever the input's order
    assert encode_sample("k", fortran, meta())[0][1] == buf.getvalue()


@pytest.mark.parametrize("bad,reason", [
    (dict(captions=["bad \ud800"]), "lone surrogate"),
    (dict(extra={"note": "half an emoji \udc3d"}), "lone surrogate"),
    (dict(extra={"deep": json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)}), "nests deeper"),
    (dict(pad_value=1e6), "float16 range"),
    (dict(pad_value=float("nan")), "finite"),
    (dict(captions=[" "]), "non-empty"),
])
def test_encode_refuses_what_decode_would_refuse(bad, reason):
    with pytest.raises(SampleError, match=reason):
        encode_sample("k", np.zeros((80, 3), np.float16), meta(**bad))


@pytest.mark.parametrize("mel,reason", [
    (np.full((80, 3), 1e5, np.float32), "NaN or inf"),  # finite as float32, inf as float16
    (np.full((80, 3), 1e300, np.float64), "NaN or inf"),
    (np.zeros((80, 3001), np.float16), "expected float16"),
    (np.zeros((80, 3), np.int16), "expected float16"),
])
def test_mels_are_checked_after_the_float16_cast(mel, reason):
    with pytest.raises(SampleError, match=reason):
        encode_sample("k", mel, meta())
    buf = io.BytesIO()
    np.save(buf, mel, allow_pickle=False)
    raw = {"__key__": "k", "__url__": "u", "mel.npy": buf.getvalue(), "json": json.dumps(dataclasses.asdict(meta())).encode()}
    with pytest.raises(SampleError, match=reason):
        decode_sample(raw)


def test_json_limits_and_bom():
    assert load_json(b"\xef\xbb\xbf{\"a\": 1}") == {"a": 1}
    with pytest.raises(ValueError, match="nests deeper"):
        load_json("[" * 100000 + "]" * 100000)  # RecursionError inside json, reported as a reason
    with pytest.raises(ValueError, match="lone surrogate"):
        load_json('{"text": "bad \\ud800"}')


def test_index_entries_that_cannot_be_true_are_refused():
    entry = {"name": "000.tar", "samples": 10**9, "seconds": 1.0, "bytes": 20480, "sha256": "ab"}
    with pytest.raises(ValueError, match="claims 1000000000 samples in 20480 bytes"):
        parse_index(json.dumps({"format": "whisper-caption-stream", "version": 1, "shards": [entry]}).encode(), "i")
    assert IndexEntry.from_dict({**entry, "samples": 10}, "i").samples == 10
    with pytest.raises(ValueError, match="version 2"):
        parse_index(json.dumps({"format": "whisper-caption-stream", "version": 2, "shards": []}).encode(), "i")


def test_key_sketches_are_optional_in_an_index_and_checked_when_present():
    """Indexes written before key sketches existed load (no sketch); a sketch is written back as read;
    a malformed one is refused naming the index."""
    entry = {"name": "000.tar", "samples": 2, "seconds": 1.0, "bytes": 20480, "sha256": "ab"}

    def parse(**fields):
        index = {"format": "whisper-caption-stream", "version": 1, "shards": [{**entry, **fields}]}
        return parse_index(json.dumps(index).encode(), "i").entries[0]

    assert parse().key_sketch is None and parse().to_dict() == entry
    sketch = ["00000000000000ff", "0123456789abcdef"]
    assert parse(key_sketch=sketch).key_sketch == (255, 0x0123456789ABCDEF)
    assert parse(key_sketch=sketch).to_dict() == {**entry, "key_sketch": sketch}
    for bad in (sketch[::-1], sketch[:1], [sketch[0]] * 2, ["xyz"], "00000000000000ff", [255, 1]):
        with pytest.raises(ValueError, match="i: bad shard entry .*key_sketch must"):
            parse(key_sketch=bad)
    with pytest.raises(ValueError) as refused:  # 200,000 hashes in one entry: still one short line
        parse(key_sketch=[f"{i:016x}" for i in range(2**63, 2**63 + 200_000)])
    assert len(str(refused.value)) < 400 and "characters)" in str(refused.value)


def test_an_index_reads_back_as_written_with_its_version():
    """The writer's ``Index.to_dict`` and the reader's ``parse_index`` are one another's inverse; the
    version this release writes is one it reads."""
    entries = [IndexEntry("000.tar", 2, 1.5, 20480, "ab", (3, 7)), IndexEntry("001.tar", 1, 0.25, 10240, "cd")]
    index = Index("train", 128, entries, truncated=1, rejected=2)
    assert index.version == FORMAT_VERSION and FORMAT_VERSION in READABLE_VERSIONS
    assert parse_index(json.dumps(index.to_dict()).encode(), "i") == index
    assert parse_index(b'{"shards": []}', "i") == Index(None, None, [])  # hand-written: the version written now
    for field, value, reason in (("split", 3, "'split' is 3, expected str"),
                                 ("totals", [], "'totals' is [], expected dict"),
                                 ("features", {"n_mels": "80"}, "'n_mels' is '80', expected int")):
        with pytest.raises(ValueError, match=f"^i: {re.escape(reason)}$"):
            parse_index(json.dumps({**index.to_dict(), field: value}).encode(), "i")
