"""Input layouts read from a dataset in a container format: raw-audio WebDataset shards (through the
loader's own ``shard_tools.urls`` and ``shard_tools.tar``) and Hugging Face datasets; the item
model, rejects and caption fields are ``shard_tools.sources``'. Order and parts: docs/packing.md,
"How the inputs are read".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

from shard_tools.shard_format import AUDIO_SUFFIXES, Reject, load_json
from shard_tools.sources import (CaptionError, InputSpec, Item, SplitInput, audio_path_problem, captions_from,
                                 part_slice, unique_keys, without)
from shard_tools.tar import ShardReadError, iter_samples
from shard_tools.urls import expand_urls, local_path, open_url


# ----------------------------------------------------------------------------- raw-audio shards

def shard_inputs(spec: InputSpec) -> list[SplitInput]:
    """One split from raw-audio WebDataset shards named as the loader names shards (brace ranges
    ``raw/{000..009}.tar`` or ``<000..009>``, globs, folders; several patterns separated by spaces);
    part I takes the I-th contiguous slice of the shards."""
    urls = expand_urls(spec.location.split())
    chosen = part_slice(urls, spec.part, spec.num_parts)
    name = spec.split or ""
    files = tuple(path for path in map(local_path, urls) if path)  # every part's: none may be overwritten
    return [SplitInput(name, None,
                       lambda: unique_keys(shard_items(chosen, spec.audio_field, spec.caption_fields, name)),
                       shard_files=files)]


def shard_items(urls: Sequence[str], audio_field: str | None, caption_fields: Sequence[str],
                split: str) -> Iterator:
    """Items for the samples of each shard in order, read by the loader's tar reader; an
    unreadable shard becomes a reject after the samples read before the fault."""
    for url in urls:
        count = 0
        try:
            with open_url(url) as stream:
                for sample in iter_samples(stream, url):
                    count += 1
                    yield shard_sample_item(sample, audio_field, caption_fields, split)
        except ShardReadError as error:
            yield Reject(url, split, f"cannot read shard after {count} samples ({error})")


def shard_sample_item(sample: dict, audio_field: str | None, caption_fields: Sequence[str],
                      split: str) -> Item | Reject:
    """An Item or reject for one webdataset sample ``{"__key__", "__url__", ext: bytes}``."""
    where = f"{sample['__url__']}#{sample['__key__']}"
    exts = [e for e in sample if not e.startswith("__")]
    audio_ext = audio_field or next((e for e in exts if f".{e}" in AUDIO_SUFFIXES), None)
    if audio_ext not in sample:
        wanted = f".{audio_field}" if audio_field else " or ".join(sorted(AUDIO_SUFFIXES))
        return Reject(where, split, f"sample has no audio member ({wanted})")
    source = f"{where}.{audio_ext}"
    try:
        fields = decoded_members(sample, exclude=audio_ext)
        captions = captions_from(fields, caption_fields)
    except CaptionError as error:
        return Reject(source, split, str(error))
    extra = without(fields.get("json", {}), [f[len("json."):] for f in caption_fields if f.startswith("json.")])
    return Item(source, split, sample[audio_ext], captions, extra if isinstance(extra, dict) else {}, source)


def decoded_members(sample: dict, exclude: str) -> dict:
    """The sample's JSON members parsed and text members decoded, for caption lookup."""
    fields = {}
    for ext, data in sample.items():
        if ext.startswith("__") or ext == exclude or not isinstance(data, bytes):
            continue
        last = ext.rsplit(".", 1)[-1]
        try:
            if last == "json":
                fields[ext] = load_json(data)
            elif last in ("txt", "text", "caption"):
                fields[ext] = data.decode("utf-8-sig")
        except ValueError as error:  # UnicodeDecodeError too
            raise CaptionError(f"member .{ext} cannot be read ({error})") from error
    return fields


# ----------------------------------------------------------------------------- Hugging Face datasets

def hf_inputs(spec: InputSpec) -> list[SplitInput]:
    """Every split (or only ``spec.split``) of a Hub dataset or a local dataset directory; audio is
    taken undecoded (``Audio(decode=False)``: the file's bytes or its path)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("--hf-dataset needs the optional 'datasets' package: "
                          "pip install 'whisper-caption-stream[hf]'") from error
    name, split, audio_field = spec.location, spec.split, spec.audio_field
    local = Path(name)
    if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
        loaded = datasets.load_from_disk(str(local))
    else:
        loaded = datasets.load_dataset(name)
    if not isinstance(loaded, datasets.DatasetDict):
        splits = {split or "": loaded}
    elif split is None:
        splits = dict(loaded)
    elif split in loaded:
        splits = {split: loaded[split]}
    else:
        raise ValueError(f"{name} has no split {split!r} (splits: {', '.join(loaded)})")
    inputs = []
    for split_name in sorted(splits):
        table = splits[split_name]
        if audio_field not in table.column_names:
            raise ValueError(f"{name} split {split_name!r} has no audio column {audio_field!r} "
                             f"(columns: {', '.join(table.column_names)})")
        table = table.cast_column(audio_field, datasets.Audio(decode=False))
        rows = part_slice(range(len(table)), spec.part, spec.num_parts)
        inputs.append(SplitInput(split_name, len(rows),
                                 _hf_items(table, rows, split_name, audio_field, spec.caption_fields)))
    return inputs


def _hf_items(table, rows: range, split: str, audio_field: str, caption_fields: Sequence[str]):
    def items() -> Iterator[Item | Reject]:
        for i in rows:
            yield hf_row_item(table[i], f"{split}/{i:08d}" if split else f"{i:08d}", split, audio_field,
                              caption_fields)
    return items


def hf_row_item(row: dict, source: str, split: str, audio_field: str,
                caption_fields: Sequence[str]) -> Item | Reject:
    audio = row.get(audio_field) or {}
    data = audio.get("bytes") or audio.get("path")
    if not data:
        return Reject(source, split, f"row has no audio in column {audio_field!r}")
    problem = isinstance(data, str) and audio_path_problem(data, f"audio path in column {audio_field!r}")
    if problem:
        return Reject(source, split, problem)
    try:
        captions = captions_from(row, caption_fields)
    except CaptionError as error:
        return Reject(source, split, str(error))
    extra = json.loads(json.dumps(without({k: v for k, v in row.items() if k != audio_field}, caption_fields),
                                  default=str))
    return Item(source, split, data, captions, extra, source)
