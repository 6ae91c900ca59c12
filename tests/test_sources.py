"""The item model and the folder and manifest layouts: what each yields for good and bad inputs,
checked against hand-written expectations (hashlib for keys)."""

import hashlib
import json
import os

import pytest

from shard_tools import sources
from shard_tools.shard_format import Reject
from tests.conftest import write_audio


def sha10(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def spec(location, captions, audio=None, **options) -> sources.InputSpec:
    """An InputSpec as the packer builds it (a string location, the caption fields as a tuple)."""
    if "skip" in options:
        options["skip"] = str(options["skip"])
    return sources.InputSpec(str(location), tuple(captions), audio, **options)


def by_source(split_input):
    return {item.source: item for item in split_input.items()}


def test_keys_follow_the_format():
    assert sources.make_key("dogs/a.b.wav") == f"dogs_a_b-{sha10('dogs/a.b.wav')}"
    assert sources.make_key("train/x y/é.flac") == f"train_x_y__-{sha10('train/x y/é.flac')}"
    assert sources.make_key("raw/000.tar#s1.flac") == f"raw_000_tar_s1-{sha10('raw/000.tar#s1.flac')}"
    # Same stem, different files: different keys.
    assert sources.make_key("a.wav") != sources.make_key("a.flac")


def test_split_folders_with_txt_and_json_captions(tmp_path):
    root = tmp_path / "ds"
    write_audio(root / "train" / "b.flac", seconds=0.2, sr=44100, channels=2)
    (root / "train" / "b.txt").write_text("  a dog barks \n")
    write_audio(root / "train" / "sub" / "a.b.wav", seconds=0.2)
    (root / "train" / "sub" / "a.b.json").write_text(json.dumps({"text": "rain falls", "id": 7}))
    write_audio(root / "my split" / "c.mp3", seconds=0.2, sr=22050)
    (root / "my split" / "c.json").write_text(json.dumps({"text": ["one", " two ", ""], "meta": {"x": 1}}))
    (root / "dataset_info.json").write_text("{}")  # top-level metadata is not an input
    (root / "train" / "notes.md").write_text("ignored")
    inputs = sources.folder_inputs(spec(root, ["text"]))
    assert [i.name for i in inputs] == ["my split", "train"]
    split_c, train = inputs
    assert train.total == 2
    items = list(train.items())
    assert [i.source for i in items] == ["train/b.flac", "train/sub/a.b.wav"]  # sorted by source
    b, ab = items
    assert b.captions == ["a dog barks"] and b.extra == {} and b.split == "train"
    assert b.audio == str(root / "train" / "b.flac")
    assert ab.key == f"train_sub_a_b-{sha10('train/sub/a.b.wav')}"
    assert ab.captions == ["rain falls"] and ab.extra == {"id": 7}
    (c,) = split_c.items()
    assert c.captions == ["one", "two"] and c.extra == {"meta": {"x": 1}} and c.split == "my split"
    assert [i.name for i in sources.folder_inputs(spec(root, ["text"], split="train"))] == ["train"]


def test_flat_folder_dotted_and_several_caption_fields(tmp_path):
    write_audio(tmp_path / "x.ogg", seconds=0.2)
    (tmp_path / "x.json").write_text(json.dumps({"json": {"text": "nested"}, "alt": ["a", "b"], "k": 1}))
    write_audio(tmp_path / "y.wav", seconds=0.2)
    (tmp_path / "y.json").write_text(json.dumps({"json.text": "literal dotted key", "alt": "c"}))
    (flat,) = sources.folder_inputs(spec(tmp_path, ["json.text", "alt"]))
    assert flat.name == ""
    x, y = flat.items()
    assert x.captions == ["nested", "a", "b"] and x.extra == {"json": {}, "k": 1}
    assert y.captions == ["literal dotted key", "c"] and y.extra == {}
    assert sources.folder_inputs(spec(tmp_path, ["text"], split="mine"))[0].name == "mine"


def test_every_bad_folder_input_is_a_reject_with_its_reason(tmp_path):
    write_audio(tmp_path / "good.wav", seconds=0.2)
    (tmp_path / "good.txt").write_text("fine")
    write_audio(tmp_path / "nocap.wav", seconds=0.2)
    (tmp_path / "orphan.txt").write_text("a caption with no audio")
    write_audio(tmp_path / "empty.wav", seconds=0.2)
    (tmp_path / "empty.txt").write_text("  \n")
    write_audio(tmp_path / "emptyjson.flac", seconds=0.2)
    (tmp_path / "emptyjson.json").write_text(json.dumps({"text": ["", " "]}))
    write_audio(tmp_path / "nofield.wav", seconds=0.2)
    (tmp_path / "nofield.json").write_text(json.dumps({"caption": "wrong field"}))
    write_audio(tmp_path / "badjson.wav", seconds=0.2)
    (tmp_path / "badjson.json").write_text("{not json")
    write_audio(tmp_path / "number.wav", seconds=0.2)
    (tmp_path / "number.json").write_text(json.dumps({"text": 3}))
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really audio")  # found bad only when decoded
    (tmp_path / "corrupt.txt").write_text("decoded later")
    items = by_source(sources.folder_inputs(spec(tmp_path, ["text"]))[0])
    reasons = {source: item.reason if isinstance(item, Reject) else None for source, item in items.items()}
    assert reasons["good.wav"] is None and reasons["corrupt.wav"] is None
    assert reasons["nocap.wav"].startswith("audio without caption")
    assert reasons["orphan.txt"] == "caption without audio"
    assert reasons["empty.wav"] == "empty.txt: empty caption"
    assert reasons["emptyjson.flac"] == "emptyjson.json: empty caption"
    assert reasons["nofield.wav"] == "nofield.json: no caption field 'text'"
    assert reasons["badjson.wav"].startswith("badjson.json: invalid JSON")
    assert "not a string" in reasons["number.wav"]
    assert all(isinstance(items[s], Reject) == (reasons[s] is not None) for s in items)


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_csv_and_jsonl(tmp_path, kind):
    write_audio(tmp_path / "audio" / "a.wav", seconds=0.2)
    write_audio(tmp_path / "audio" / "b.flac", seconds=0.2, sr=32000)
    rows = [{"audio_file": "audio/b.flac", "caption_text": "bee", "lang": "en"},
            {"audio_file": "audio/a.wav", "caption_text": "first", "lang": "en"},
            {"audio_file": "audio/a.wav", "caption_text": "second", "lang": "en"},  # merged with the row above
            {"audio_file": "audio/missing.wav", "caption_text": "gone", "lang": "en"},
            {"audio_file": "audio/b.flac", "caption_text": " ", "lang": "en"}]
    manifest = tmp_path / "meta" / f"captions.{kind}"
    manifest.parent.mkdir()
    for row in rows:
        row["audio_file"] = "../" + row["audio_file"]  # paths are relative to the manifest
    if kind == "csv":
        lines = ["audio_file,caption_text,lang"] + [f"{r['audio_file']},{r['caption_text']},{r['lang']}" for r in rows]
        manifest.write_text("\n".join(lines) + "\n")
    else:
        manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    (split,) = sources.manifest_inputs(spec(manifest, ["caption_text"], "audio_file", split="train"))
    items = list(split.items())
    assert split.name == "train" and all(i.split == "train" for i in items)
    good = [i for i in items if not isinstance(i, Reject)]
    bad = [i for i in items if isinstance(i, Reject)]
    assert [(i.source, i.captions, i.extra) for i in good] == [
        ("../audio/a.wav", ["first", "second"], {"lang": "en"}),
        ("../audio/b.flac", ["bee"], {"lang": "en"})]
    assert os.path.samefile(good[0].audio, tmp_path / "audio" / "a.wav")
    first = 2 if kind == "csv" else 1  # the line of the first row
    expected = [("../audio/b.flac", f"captions.{kind}:{first + 4}: empty caption"),
                ("../audio/missing.wav", f"captions.{kind}:{first + 3}: audio file not found "
                                         f"({tmp_path / 'audio' / 'missing.wav'})")]
    if kind == "jsonl":
        expected.append(("captions.jsonl:6", "invalid JSON line (Expecting property name enclosed in double "
                                                "quotes: line 1 column 2 (char 1))"))
    assert [(i.source, i.reason) for i in bad] == expected


def test_parts_are_disjoint_and_cover():
    seq = list(range(10))
    for n in (1, 3, 4, 12):
        parts = [list(sources.part_slice(seq, i, n)) for i in range(n)]
        assert sum(parts, []) == seq
    with pytest.raises(ValueError):
        sources.part_slice(seq, 3, 3)


def test_folder_parts_slice_each_split(tmp_path):
    for i in range(7):
        write_audio(tmp_path / "train" / f"{i}.wav", seconds=0.1)
        (tmp_path / "train" / f"{i}.txt").write_text(f"c{i}")
    parts = [sources.folder_inputs(spec(tmp_path, ["text"], part=p, num_parts=3))[0] for p in range(3)]
    assert [p.total for p in parts] == [2, 2, 3]
    assert sum(([i.source for i in p.items()] for p in parts), []) == [f"train/{i}.wav" for i in range(7)]


def test_lookup_and_without():
    obj = {"a": {"b": 1, "c": 2}, "a.b": 3, "d": [4]}
    assert sources.lookup(obj, "a.b") == 3 and sources.lookup(obj, "a.c") == 2 and sources.lookup(obj, "d") == [4]
    with pytest.raises(KeyError):
        sources.lookup(obj, "a.x")
    assert sources.without(obj, ["a.c", "zz"]) == {"a": {"b": 1}, "a.b": 3, "d": [4]}
    assert obj["a"] == {"b": 1, "c": 2}  # the input is not changed
    assert sources.parse_fields("caption_1, caption_2") == ["caption_1", "caption_2"]


def test_every_caption_file_beside_a_clip_gives_references(tmp_path):
    write_audio(tmp_path / "cat.wav", seconds=0.2)
    (tmp_path / "cat.txt").write_text("a cat purrs\n")
    (tmp_path / "cat.json").write_text(json.dumps({"text": ["a cat meows", "a cat purrs"], "id": 3}))
    write_audio(tmp_path / "dog.wav", seconds=0.2)
    (tmp_path / "dog.json").write_text(json.dumps({"text": "a dog barks"}))
    (tmp_path / "dog.txt").write_text(" \n")  # a bad second caption file rejects the clip, naming it
    items = by_source(sources.folder_inputs(spec(tmp_path, ["text"]))[0])
    cat = items["cat.wav"]
    assert cat.captions == ["a cat meows", "a cat purrs"] and cat.extra == {"id": 3}  # no repeat
    assert items["dog.wav"].reason == "dog.txt: empty caption"
    assert sorted(items) == ["cat.wav", "dog.wav"]


def test_symlinked_folders_are_followed_and_each_place_read_once(tmp_path):
    root, elsewhere = tmp_path / "ds", tmp_path / "elsewhere" / "more"
    write_audio(root / "train" / "a.wav", seconds=0.2)
    (root / "train" / "a.txt").write_text("in the split")
    write_audio(elsewhere / "b.wav", seconds=0.2)
    (elsewhere / "b.txt").write_text("behind a link")
    (root / "train" / "linked").symlink_to(elsewhere)
    (root / "train" / "again").symlink_to(elsewhere)  # a second path to the same folder
    (elsewhere / "loop").symlink_to(root / "train")  # back to the split: a loop
    (root / "train" / "up").symlink_to(root)  # to the dataset folder: a loop
    (root / "train" / "link.wav").symlink_to(root / "train" / "a.wav")  # a second path to a clip
    (root / "train" / "link.txt").write_text("same clip")  # with a new caption: added to a.wav's
    (root / "train" / "same.wav").symlink_to(root / "train" / "a.wav")  # with no new caption: a repeat
    (root / "train" / "same.txt").write_text("in the split")
    (root / "copy").symlink_to(root / "train")  # a split folder that is another split
    copy, train = sources.folder_inputs(spec(root, ["text"]))
    items = by_source(train)  # repeats lose no input: they are not inputs, not even rejects
    assert {s: i.captions for s, i in items.items()} == {
        "train/a.wav": ["in the split", "same clip"], "train/again/b.wav": ["behind a link"]}
    assert train.total == 2
    assert {r.source: r.note for r in train.repeats} == {
        "train/again/loop/": "same folder as train/ (a symlink loop or a second path to it): read once",
        "train/linked/": "same folder as train/again/ (a symlink loop or a second path to it): read once",
        "train/up/": "same folder as the dataset folder (a symlink loop or a second path to it): read once",
        "train/same.wav": "same audio file as train/a.wav (a symlink or a second path to it) with no new "
                          "caption: packed once"}
    assert list(copy.items()) == [] and copy.repeats == (
        sources.Repeat("copy/", "copy", "same folder as train/ (a symlink loop or a second path to it): read once"),)


def test_the_skipped_folder_is_never_read(tmp_path):
    """The packer's --out inside the dataset: its index.json files are not captions without audio."""
    write_audio(tmp_path / "train" / "a.wav", seconds=0.1)
    (tmp_path / "train" / "a.txt").write_text("a")
    for out in (tmp_path / "packed", tmp_path / "train" / "deep"):
        (out / "train").mkdir(parents=True)
        (out / "train" / "index.json").write_text("{}")
    (tmp_path / "train" / "to_out").symlink_to(tmp_path / "train" / "deep")  # inside it by another path
    (train,) = sources.folder_inputs(spec(tmp_path, ["text"], skip=tmp_path / "packed"))  # not a split
    assert [i.source for i in train.items()] == ["train/a.wav", "train/deep/train/index.json"]
    assert [r.source for r in train.repeats] == ["train/to_out/"]
    packed, train = sources.folder_inputs(spec(tmp_path, ["text"], skip=tmp_path / "train" / "deep"))
    assert [i.source for i in train.items()] == ["train/a.wav"] and train.repeats == ()
    (flat,) = sources.folder_inputs(spec(tmp_path / "train", ["text"], skip=tmp_path / "train" / "deep"))
    assert [i.source for i in flat.items()] == ["a.wav"] and flat.repeats == ()


def test_manifest_repeated_rows_merge_new_captions_and_report_repeats(tmp_path):
    write_audio(tmp_path / "audio" / "a.wav", seconds=0.2)
    (tmp_path / "link.wav").symlink_to(tmp_path / "audio" / "a.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("audio_file,caption_text\naudio/a.wav,a hum\naudio/a.wav,a hum\n"
                        "./audio/a.wav,a low hum\nlink.wav,a hum\n")
    (split_input,) = sources.manifest_inputs(spec(manifest, ["caption_text"], "audio_file"))
    assert [(i.source, i.captions) for i in split_input.items()] == [
        ("audio/a.wav", ["a hum", "a low hum"])]  # one file by any path, each caption once
    assert [(r.source, r.note) for r in split_input.repeats] == [
        ("m.csv:3", "repeats m.csv:2: the same audio file with no new caption"),
        ("m.csv:5", "repeats m.csv:2: the same audio file with no new caption")]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_rows_that_name_no_file_are_rejects_naming_the_row(tmp_path, kind):
    write_audio(tmp_path / "a.wav", seconds=0.2)
    manifest = tmp_path / f"m.{kind}"
    if kind == "csv":  # rows named by the line they start on, after a caption of two lines
        manifest.write_bytes(b'audio_file,caption_text\na.wav,"two\nlines"\nb\0.wav,a NUL byte\n'
                             b'a.wav,one,too many\n\xff.wav,not UTF-8\na.wav,' + b"x" * 200_000 + b"\na.wav,fine\n")
        expected = [("m.csv:4", "audio field 'audio_file' holds a NUL byte"),
                    ("m.csv:5", "row has 3 fields, the header 2"), ("m.csv:6", "field 'audio_file' is not UTF-8 text"),
                    ("m.csv:7", "unreadable CSV row (field larger than field limit (131072))")]
        captions = ["two\nlines", "fine"]
    else:
        manifest.write_bytes(b'["a.wav", "an array"]\n7\n{"audio_file": "b\\u0000.wav", "caption_text": "x"}\n'
                             b'{"audio_file": "\xff.wav", "caption_text": "x"}\n'
                             b'{"audio_file": ["a.wav"], "caption_text": "x"}\n{"caption_text": "x"}\n'
                             b'{"audio_file": "a.wav", "caption_text": "fine"}\n')
        expected = [("m.jsonl:1", "JSON line is not an object"), ("m.jsonl:2", "JSON line is not an object"),
                    ("m.jsonl:3", "audio field 'audio_file' holds a NUL byte"),
                    ("m.jsonl:4", "invalid JSON line ('utf-8' codec can't decode byte 0xff in position 16: "
                                  "invalid start byte)"),
                    ("m.jsonl:5", "audio field 'audio_file' is not a string (a list)"),
                    ("m.jsonl:6", "row has no audio field 'audio_file'")]
        captions = ["fine"]
    items = list(sources.manifest_inputs(spec(manifest, ["caption_text"], "audio_file"))[0].items())
    assert [(i.source, i.captions) for i in items if not isinstance(i, Reject)] == [("a.wav", captions)]
    assert [(i.source, i.reason) for i in items if isinstance(i, Reject)] == expected


def test_folders_of_packed_shards_are_skipped_with_a_note(tmp_path, capsys):
    write_audio(tmp_path / "train" / "a.wav", seconds=0.1)
    (tmp_path / "train" / "a.txt").write_text("a")
    index = json.dumps({"shards": []})  # the packer's index of an empty split
    for folder in (tmp_path / "old" / "train", tmp_path / "train" / "deep", tmp_path / "train" / "x" / "split"):
        folder.mkdir(parents=True)
        (folder / "index.json").write_text(index)
    (tmp_path / "train" / "other").mkdir()
    (tmp_path / "train" / "other" / "index.json").write_text("{}")  # not an index: a caption without audio
    (train,) = sources.folder_inputs(spec(tmp_path, ["text"]))
    assert [i.source for i in train.items()] == ["train/a.wav", "train/other/index.json"]
    assert capsys.readouterr().err.splitlines() == [
        f"note: {tmp_path / p} is skipped: it holds packed shards (index.json), not inputs"
        for p in ("old", "train/deep", "train/x")]


def test_a_second_path_to_a_clip_without_a_caption_file_is_a_repeat(tmp_path):
    write_audio(tmp_path / "train" / "b.wav", seconds=0.1)
    (tmp_path / "train" / "b.txt").write_text("b")
    (tmp_path / "train" / "a_link.wav").symlink_to(tmp_path / "train" / "b.wav")  # sorted before its target
    write_audio(tmp_path / "train" / "lone.wav", seconds=0.1)
    (tmp_path / "train" / "lone_link.wav").symlink_to(tmp_path / "train" / "lone.wav")  # no caption on any path
    (train,) = sources.folder_inputs(spec(tmp_path, ["text"]))
    items = by_source(train)
    assert items["train/b.wav"].captions == ["b"]
    assert {s: i.reason for s, i in items.items() if isinstance(i, Reject)} == {
        "train/lone.wav": "audio without caption (no lone.txt or lone.json beside it)",
        "train/lone_link.wav": "audio without caption (no lone_link.txt or lone_link.json beside it)"}
    assert train.repeats == (sources.Repeat("train/a_link.wav", "train", "same audio file as train/b.wav (a symlink "
                                            "or a second path to it) with no caption beside it: packed once"),)


def test_merge_same_audio_keeps_each_file_once_at_its_first_item(tmp_path):
    clip = write_audio(tmp_path / "a.wav", seconds=0.1)
    (tmp_path / "link.wav").symlink_to(clip)

    def item(source, captions, origin):
        return sources.Item(source, "", str(tmp_path / source), captions, {}, origin)

    bad = Reject("b.wav", "", "no caption")
    items = [item("a.wav", ["one"], "m:1"), bad, item("link.wav", ["one", "two"], "m:2"), item("a.wav", ["two"], "m:3")]
    merged = sources.merge_same_audio(items, lambda first: f"repeats {first.origin}")
    assert merged == [item("a.wav", ["one", "two"], "m:1"), bad, sources.Repeat("m:3", "", "repeats m:1")]
    assert items[0].captions == ["one"]  # the inputs are not changed
