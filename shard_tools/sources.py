"""The packer's item model (``Item``, ``Repeat``, ``SplitInput``, caption fields) and its file-listing
input layouts, folders and manifests; ``shard_tools.source_shards`` reads the container formats and
``shard_tools.layouts`` is the table of all of them. Readers yield items and rejects per split in a
deterministic order; a second path to an input already read is a ``Repeat``, never a reject.
Each layout's rules: docs/packing.md, "How the inputs are read".
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import posixpath
import re
import stat
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from shard_tools.shard_format import AUDIO_SUFFIXES, INDEX_FILE, Reject, check_text, load_json, parse_index

CAPTION_SUFFIXES = (".json", ".txt")  # in order of preference when both sit beside one clip
DATASET_FOLDER = "the dataset folder"  # how rejects and repeats name the folder given to the packer
KEY_HASH_DIGITS = 10


@dataclass(frozen=True)
class Repeat:
    """A second path to a folder, clip or manifest row already read: reported, never an input."""

    source: str
    split: str
    note: str  # what it repeats


@dataclass(frozen=True)
class InputSpec:
    """What a layout's reader reads: the input as given (a folder, manifest, shard pattern or dataset
    name), where the audio (None: the reader finds it) and the captions are, the part of it
    (``part_slice``), the one split to read or to name the output (None: every split, or ""), and a
    folder never read, nor anything under it (the packer's output inside a folder input)."""

    location: str
    caption_fields: tuple[str, ...]
    audio_field: str | None = None
    part: int = 0
    num_parts: int = 1
    split: str | None = None
    skip: str | None = None


@dataclass(frozen=True)
class SplitInput:
    """One output split of one part: its name ("" for a flat output), how many inputs it has (for
    the progress bar; None when streaming raw shards), a factory of its ordered item stream
    (``item_digest`` tells ``--resume`` whether an input changed), the repeats among its inputs and
    the local raw shards it reads (which no output may be written over)."""

    name: str
    total: int | None
    items: Callable[[], Iterator]
    repeats: tuple[Repeat, ...] = ()
    shard_files: tuple[str, ...] = ()


def fingerprint(obj) -> str:
    """SHA-256 of a JSON-able description of the inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class CaptionError(ValueError):
    """A caption that cannot be used; the message is the reject reason."""


# ----------------------------------------------------------------------------- keys and fields

def make_key(source: str) -> str:
    """The FORMAT.md key: the source without its extension, characters outside ``[A-Za-z0-9_-]``
    replaced by ``_``, then ``-`` and 10 hex digits of the SHA-1 of the full source."""
    stem = posixpath.splitext(source)[0]
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    # surrogatepass: a file name that is not UTF-8 (os.listdir's surrogate escapes) still hashes
    return f"{slug}-{hashlib.sha1(source.encode('utf-8', 'surrogatepass')).hexdigest()[:KEY_HASH_DIGITS]}"


def parse_fields(spec: str) -> list[str]:
    """``"a,b.c"`` -> ``["a", "b.c"]``: the caption fields, each a dotted path."""
    fields = [f.strip() for f in spec.split(",") if f.strip()]
    if not fields:
        raise ValueError(f"no field named in {spec!r}")
    return fields


def lookup(obj, path: str):
    """The value at dotted ``path`` in nested dicts; the longest literal key matches first, so
    ``{"json.text": …}`` and ``{"json": {"text": …}}`` both answer ``json.text``. KeyError if absent."""
    parent, leaf = _parent_of(obj, path)
    if parent is None:
        raise KeyError(path)
    return parent[leaf]


def without(obj: dict, paths: Iterable[str]) -> dict:
    """A copy of ``obj`` without the leaves at ``paths`` (those that exist)."""
    out = copy.deepcopy(obj)
    for path in paths:
        parent, leaf = _parent_of(out, path)
        if parent is not None:
            del parent[leaf]
    return out


def _parent_of(obj, path: str) -> tuple[dict | None, str | None]:
    """``(the dict holding the leaf of path, the leaf's key)``, or ``(None, None)``."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if isinstance(obj, dict) and head in obj:
            return (obj, head) if i == len(parts) else _parent_of(obj[head], ".".join(parts[i:]))
    return None, None


def captions_from(obj, fields: Sequence[str]) -> list[str]:
    """All captions at ``fields`` of ``obj``, stripped; CaptionError (the reject reason) otherwise."""
    captions = []
    for field in fields:
        try:
            value = lookup(obj, field)
        except KeyError:
            raise CaptionError(f"no caption field {field!r}") from None
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            raise CaptionError(f"caption field {field!r} is not a string or a list of strings")
        try:
            captions += [check_text(v, f"caption field {field!r}").strip() for v in values if v.strip()]
        except ValueError as error:
            raise CaptionError(str(error)) from None
    if not captions:
        raise CaptionError("empty caption")
    return captions


@dataclass(frozen=True)
class Item:
    """One input to pack. ``audio`` is a file path or the encoded file's bytes, left undecoded so that
    decoding runs in the packer's workers; ``captions`` are stripped, non-empty strings (none only for
    a clip that a folder reader has not yet matched with a caption file, see ``unique_files``);
    ``extra`` holds the input's own fields other than the audio and caption fields; ``origin`` is where
    it was read (its source, or a manifest row such as ``captions.csv:3``): what a repeat of it names."""

    source: str
    split: str
    audio: str | bytes
    captions: list[str]
    extra: dict
    origin: str

    @property
    def key(self) -> str:
        """The sample's key in the shards (``make_key``)."""
        return make_key(self.source)


def item_digest(item) -> str:
    """What an input is, contents included (a file's size and mtime, an in-memory file's bytes), so
    that ``--resume`` repacks from the first input that changed (a rejected file fixed since)."""
    if isinstance(item, Reject):
        return fingerprint([item.source, item.reason])
    audio = item.audio
    if isinstance(audio, str):
        try:
            info = os.stat(audio)
            audio = [audio, info.st_size, info.st_mtime_ns]
        except OSError as error:
            audio = [audio, type(error).__name__]
    else:
        audio = hashlib.sha256(audio).hexdigest()
    return fingerprint([item.source, item.captions, item.extra, audio])


def unique_keys(items: Iterable) -> Iterator:
    """Pass items through; an Item whose key was already seen becomes a reject (the same source
    twice, or a 40-bit hash collision), so keys are unique within the split."""
    seen: dict[str, str] = {}
    for item in items:
        if isinstance(item, Item):
            key = item.key
            if key in seen:
                item = Reject(item.source, item.split, f"duplicate key {key} (first from {seen[key]})")
            else:
                seen[key] = item.source
        yield item


def part_slice(seq: Sequence, part: int, num_parts: int) -> Sequence:
    """The ``part``-th of ``num_parts`` contiguous, disjoint slices that together cover ``seq``."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} is not in 0..{num_parts - 1}")
    n = len(seq)
    return seq[part * n // num_parts:(part + 1) * n // num_parts]


def listed(name: str, items: list, part: int, num_parts: int) -> SplitInput:
    """A SplitInput over an in-memory, already ordered item list (keys checked across all parts);
    each part holds the repeats of its own slice."""
    chosen = part_slice(list(unique_keys(items)), part, num_parts)
    inputs = [item for item in chosen if not isinstance(item, Repeat)]
    return SplitInput(name, len(inputs), lambda: iter(inputs), tuple(i for i in chosen if isinstance(i, Repeat)))


# ----------------------------------------------------------------------------- folder layout

def inside(path: str | Path, folder: str) -> bool:
    """``path`` (resolved here) is the resolved ``folder`` or lies under it."""
    path = os.path.realpath(path)
    return os.path.commonpath([path, folder]) == folder


def folder_inputs(spec: InputSpec) -> list[SplitInput]:
    """Split folders (ROOT holds no audio itself) or a flat folder (output split ``spec.split`` or "");
    the folder ``spec.skip`` (the packer's output, inside ROOT) and all under it are never read."""
    root, split = Path(spec.location), spec.split
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    skip = os.path.realpath(spec.skip) if spec.skip is not None else None
    entries = sorted(os.listdir(root))
    flat = any(file_kind(os.path.splitext(e)[1]) == "audio" and not (root / e).is_dir() for e in entries)
    if flat:
        return [listed(split or "", folder_items(root, root, split or "", spec.caption_fields, skip=skip),
                       spec.part, spec.num_parts)]
    names = [e for e in entries if (root / e).is_dir() and not e.startswith(".")
             and not (skip and inside(root / e, skip)) and not packed_split(root / e)]
    claimed = {os.path.realpath(root): DATASET_FOLDER}  # resolved folder -> the split folder that is it
    for name in sorted(names, key=lambda n: (root / n).is_symlink()):  # the folder itself before links to it
        claimed.setdefault(os.path.realpath(root / name), f"{name}/")
    names = [name for name in names if split is None or name == split]
    if not names:
        raise FileNotFoundError(f"{root} holds no audio files and no split folder"
                                + (f" named {split!r}" if split else ""))
    return [listed(name, folder_items(root, root / name, name, spec.caption_fields, claimed, skip),
                   spec.part, spec.num_parts)
            for name in names]


def folder_items(root: Path, directory: Path, split: str, caption_fields: Sequence[str],
                 claimed: dict[str, str] | None = None, skip: str | None = None) -> list:
    """Items, rejects and repeats for every audio and caption file under ``directory``, sorted by
    source; a folder that cannot be listed is a reject of its own. Symlinked folders are followed,
    each folder read once by its resolved path: a symlink loop, or a second path to a folder already
    read (``claimed`` holds the dataset folder and every split folder), is a repeat naming the
    first. The resolved folder ``skip`` and all under it are not read."""
    items = []
    seen = {os.path.realpath(root): DATASET_FOLDER, **(claimed or {})}

    def rel(path: str | Path) -> str:
        return Path(path).relative_to(root).as_posix()

    def unreadable(error: OSError) -> None:
        items.append(Reject(f"{rel(error.filename)}/", split,
                            f"cannot read folder ({type(error).__name__}: {error.strerror})"))

    def first_visit(path: Path) -> bool:
        label = f"{rel(path)}/" if path != root else DATASET_FOLDER
        first = seen.setdefault(os.path.realpath(path), label)
        if first != label:
            items.append(Repeat(label, split, f"same folder as {first} (a symlink loop or a second path to it): "
                                              "read once"))
        return first == label

    if not first_visit(directory):
        return items
    for dirpath, dirnames, filenames in os.walk(directory, onerror=unreadable, followlinks=True):
        dirnames[:] = [name for name in sorted(dirnames) if not (skip and inside(Path(dirpath) / name, skip))
                       and first_visit(Path(dirpath) / name)]
        if Path(dirpath) != directory and packed_output(Path(dirpath), filenames, dirnames):
            dirnames[:] = []
            continue
        groups: dict[str, dict[str, list[str]]] = {}  # stem -> {"audio": [...], "caption": [...]}
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            kind = file_kind(suffix)
            if kind:
                groups.setdefault(stem, {"audio": [], "caption": []})[kind].append(name)
        rel_dir = rel(dirpath)
        for stem, group in groups.items():
            items += _group_items(Path(dirpath), rel_dir, stem, group, split, caption_fields)
    return unique_files(sorted(items, key=lambda item: item.source))


def is_shard_index(path: Path) -> bool:
    """``path`` is a readable ``index.json`` of this project's shards."""
    if not path.is_file():
        return False
    try:
        parse_index(path.read_bytes(), str(path))
    except (OSError, ValueError):  # not an index: then it is read as a caption file (and rejected)
        return False
    return True


def packed_output(directory: Path, files: list[str], folders: list[str]) -> bool:
    """Whether ``directory`` (holding ``files`` and ``folders``) is the packer's output: a split of it
    (an index.json of its own) or the output of split folders (no audio or caption file and every
    folder a split of it). Noted on stderr, it is skipped: its index.json files are not captions.
    Only files named index.json are read, so the check costs little."""
    if INDEX_FILE in files:
        packed = is_shard_index(directory / INDEX_FILE)
    else:
        packed = (bool(folders) and not any(file_kind(os.path.splitext(name)[1]) for name in files)
                  and all(is_shard_index(directory / name / INDEX_FILE) for name in folders))
    if packed:
        print(f"note: {directory} is skipped: it holds packed shards ({INDEX_FILE}), not inputs", file=sys.stderr)
    return packed


def packed_split(directory: Path) -> bool:
    """``packed_output`` for a split folder; one that cannot be listed is read (and rejected) as a split."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return False
    return packed_output(directory, [e.name for e in entries if not e.is_dir()],
                         [e.name for e in entries if e.is_dir()])


def unique_files(items: list) -> list:
    """``items`` with each audio file (by resolved path) packed once, as a manifest's rows are
    (``merge_same_audio``); a path with no caption file beside it is a repeat when another path to
    its clip has one, else a reject. Either way no input is lost, so neither is a rejected input; a
    clip with no caption file on any path is."""
    captioned: dict[str, str] = {}  # resolved audio file -> the first path to it with captions
    for item in items:
        if isinstance(item, Item) and item.captions:
            captioned.setdefault(os.path.realpath(item.audio), item.source)
    out = []
    for item in items:
        if isinstance(item, Item) and not item.captions:  # no caption file beside this path
            earlier = captioned.get(os.path.realpath(item.audio))
            stem = posixpath.splitext(posixpath.basename(item.source))[0]
            item = (Repeat(item.source, item.split, f"same audio file as {earlier} (a symlink or a second "
                                                    "path to it) with no caption beside it: packed once")
                    if earlier else Reject(item.source, item.split,
                                           f"audio without caption (no {stem}.txt or {stem}.json beside it)"))
        out.append(item)
    return merge_same_audio(out, lambda first: f"same audio file as {first.source} (a symlink or a second path "
                                               "to it) with no new caption: packed once")


def merge_same_audio(items: list, repeat_note: Callable[[Item], str]) -> list:
    """``items`` with each audio file (by resolved path) packed once, at its first Item: a later Item
    for that file adds its new captions to the first and is dropped; one that adds none becomes a
    Repeat naming its origin, with ``repeat_note(first Item)``. Other items pass through in order."""
    first: dict[str, int] = {}  # resolved audio file -> position of its first Item in ``out``
    out = []
    for item in items:
        if isinstance(item, Item):
            resolved = os.path.realpath(item.audio)
            if resolved in first:
                earlier = out[first[resolved]]
                added = new_captions(earlier.captions, item.captions)
                if added:
                    out[first[resolved]] = replace(earlier, captions=earlier.captions + added)
                    continue
                item = Repeat(item.origin, item.split, repeat_note(earlier))
            else:
                first[resolved] = len(out)
        out.append(item)
    return out


def file_kind(suffix: str) -> str | None:
    """"audio", "caption" or None (a file the packer ignores) for a file name suffix."""
    suffix = suffix.lower()
    return "audio" if suffix in AUDIO_SUFFIXES else "caption" if suffix in CAPTION_SUFFIXES else None


def not_regular(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file ("not found", "is not a regular file", ...; a FIFO would
    block its reader forever), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as error:
        return f"cannot be read ({type(error).__name__}: {error.strerror})"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def _group_items(directory: Path, rel_dir: str, stem: str, group: dict, split: str,
                 caption_fields: Sequence[str]) -> list:
    """The Items or rejects of the audio files of one stem; every caption file beside them
    (``clip.json``, then ``clip.txt``) gives references, so none is ignored."""
    def rel(name: str) -> str:
        return name if rel_dir == "." else f"{rel_dir}/{name}"

    if not group["audio"]:
        return [Reject(rel(name), split, "caption without audio") for name in group["caption"]]
    if not group["caption"]:  # a reject unless another path to the clip has captions (``unique_files``)
        return [Item(rel(name), split, str(directory / name), [], {}, rel(name)) for name in group["audio"]]
    captions, extra = [], {}
    for name in sorted(group["caption"], key=lambda n: (CAPTION_SUFFIXES.index(os.path.splitext(n)[1].lower()), n)):
        try:
            more, more_extra = read_caption_file(directory / name, caption_fields)
        except CaptionError as error:
            return [Reject(rel(audio), split, f"{name}: {error}") for audio in group["audio"]]
        captions += new_captions(captions, more)
        extra = {**more_extra, **extra}  # the preferred file's fields win
    items = []
    for name in group["audio"]:
        problem = not_regular(directory / name)
        items.append(Reject(rel(name), split, f"audio file {problem}") if problem
                     else Item(rel(name), split, str(directory / name), captions, extra, rel(name)))
    return items


def new_captions(captions: list[str], more: list[str]) -> list[str]:
    """The captions of ``more`` not already in ``captions``: a second caption file or manifest row
    for a clip adds references, never a repeat of one."""
    return [c for c in more if c not in captions]


def read_caption_file(path: Path, caption_fields: Sequence[str]) -> tuple[list[str], dict]:
    """``(captions, extra)`` from a ``.txt`` (the whole file) or ``.json`` (the caption fields); a
    UTF-8 byte-order mark is not part of the caption."""
    problem = not_regular(path)
    if problem:
        raise CaptionError(f"caption file {problem}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CaptionError(f"cannot read caption file ({type(error).__name__}: {error.strerror})") from error
    if path.suffix.lower() == ".txt":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise CaptionError(f"caption file is not UTF-8 ({error})") from error
        if not text.strip():
            raise CaptionError("empty caption")
        return [text.strip()], {}
    try:
        obj = load_json(data)
    except ValueError as error:
        raise CaptionError(str(error)) from error
    if not isinstance(obj, dict):
        raise CaptionError("JSON is not an object")
    return captions_from(obj, caption_fields), without(obj, caption_fields)


# ----------------------------------------------------------------------------- manifest layout

def manifest_inputs(spec: InputSpec) -> list[SplitInput]:
    """One split (``spec.split`` or "") from a JSONL or CSV manifest."""
    split = spec.split or ""
    return [listed(split, manifest_items(Path(spec.location), spec.audio_field, spec.caption_fields, split),
                   spec.part, spec.num_parts)]


def manifest_rows(path: Path) -> Iterator[tuple[str, dict | None, str]]:
    """``(where, row or None, error)`` for each row of a ``.csv`` or JSON-lines manifest. Bytes that
    are not UTF-8 are kept as surrogate escapes, so that they cost only their own row (a path or
    caption that is not valid Unicode is a reject)."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if path.suffix.lower() == ".csv":
            yield from _csv_rows(path.name, f)
            return
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:  # the line's own bytes, so that a decoding error names the byte
                row = load_json(line.encode("utf-8", "surrogateescape"), "JSON line")
            except ValueError as error:
                yield f"{path.name}:{i}", None, str(error)
                continue
            yield f"{path.name}:{i}", row, "" if isinstance(row, dict) else "JSON line is not an object"


def _csv_rows(name: str, f) -> Iterator[tuple[str, dict | None, str]]:
    """``manifest_rows`` of a CSV file: each row keyed by the header (line 1), named by the line it
    starts on (a quoted caption may span lines)."""
    reader = csv.reader(f)
    header = next(reader, [])
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # a field over csv's size limit; the reader goes on after it
            yield f"{name}:{start}", None, f"unreadable CSV row ({error})"
            continue
        if not values:  # a blank line
            continue
        if len(values) > len(header):
            yield f"{name}:{start}", None, f"row has {len(values)} fields, the header {len(header)}"
            continue
        row = dict(zip(header, values))
        try:
            for field, value in row.items():
                check_text(value, field)
        except ValueError:  # a surrogate escape (manifest_rows): bytes that are not UTF-8
            yield f"{name}:{start}", None, f"field {field!r} is not UTF-8 text"
            continue
        yield f"{name}:{start}", row, ""


def manifest_items(path: Path, audio_field: str, caption_fields: Sequence[str], split: str) -> list:
    """Items (the rows naming one audio file, by resolved path, merged), rejects and repeats,
    sorted by source."""
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    base = path.resolve().parent
    items = []
    for where, row, error in manifest_rows(path):
        problem = error or audio_path_problem(row.get(audio_field), f"audio field {audio_field!r}")
        if problem:
            items.append(Reject(where, split, problem))
            continue
        source = posixpath.normpath(row[audio_field].strip().replace(os.sep, "/"))
        try:
            captions = captions_from(row, caption_fields)
        except CaptionError as err:
            items.append(Reject(source, split, f"{where}: {err}"))
            continue
        file = Path(os.path.normpath(base / source))
        problem = not_regular(file)
        items.append(Reject(source, split, f"{where}: audio file {problem} ({file})") if problem
                     else Item(source, split, str(file), captions, without(row, [audio_field, *caption_fields]),
                               where))
    merged = merge_same_audio(items, lambda first: f"repeats {first.origin}: the same audio file with no new caption")
    # an Item before the rejects of its own source, as the rows naming one file are one Item
    return sorted(merged, key=lambda item: (item.source, not isinstance(item, Item)))


def audio_path_problem(path, what: str) -> str | None:
    """Why ``path`` (an input's audio value) cannot name a file, or None: not a string, blank, or
    holding a NUL byte (which the OS refuses)."""
    if path is None or isinstance(path, str) and not path.strip():
        return f"row has no {what}"
    if not isinstance(path, str):
        return f"{what} is not a string (a {type(path).__name__})"
    return f"{what} holds a NUL byte" if "\0" in path else None
