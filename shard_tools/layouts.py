"""The packer's input layouts, one table: for each, how the command line names its input, where its
audio and captions are unless told, and the reader that lists its inputs. ``shard_tools.pack``
derives its input options, their help and defaults, and its dispatch from ``LAYOUTS``, so a new
layout is a reader (taking an ``InputSpec``) and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from shard_tools import source_shards, sources
from shard_tools.sources import InputSpec, SplitInput


@dataclass(frozen=True)
class Layout:
    """One input layout. ``name`` is recorded in each output's ``--resume`` settings: it never changes.
    ``option`` names the input on the command line; None makes it the positional argument (one layout
    at most, else argparse could not tell them apart), named by its ``metavar``."""

    name: str
    option: str | None
    metavar: str
    help: str
    read: Callable[[InputSpec], list[SplitInput]]
    caption_field: str  # the default --caption-field
    audio_field: str | None = None  # the default --audio-field; None: the reader finds the audio
    audio_help: str | None = None  # what --audio-field names in this layout; None: it takes none
    local: bool = False  # a local path: recorded absolute, so ds, ds/ and ./ds are one input
    # Every file under the input folder is an input: an --out inside it is not read, and an output
    # that would be written among its inputs is refused.
    lists_folder: bool = False

    @property
    def named(self) -> str:
        """How a user names the input: its option or the positional argument's metavar."""
        return self.option or self.metavar


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("folder", None, "DATASET", "folder of split folders (train/, validation/, …) or a flat folder: "
           "audio with a .txt or .json caption beside each file", sources.folder_inputs, "text",
           local=True, lists_folder=True),
    Layout("manifest", "--manifest", "FILE", "JSONL or CSV manifest; audio paths relative to it",
           sources.manifest_inputs, "caption_text", "audio_file", "its column", local=True),
    Layout("shards", "--from-shards", "PATTERN", "raw-audio WebDataset shards, e.g. 'raw/{000..009}.tar' "
           "(several patterns separated by spaces)", source_shards.shard_inputs, "json.text",
           audio_help="the member's extension (default: the first audio member)"),
    Layout("hf", "--hf-dataset", "NAME_OR_DIR", "Hugging Face dataset name or local dataset directory "
           "(needs the optional 'datasets' package)", source_shards.hf_inputs, "text", "audio", "its column"),
)}
