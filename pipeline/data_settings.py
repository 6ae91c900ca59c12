"""The typed settings of the shard loader and the collator: one object, one home for every default.

``make_loader`` and ``Collator`` take a ``DataSettings``; ``pipeline.config.DataConfig`` takes its
defaults from here and ``configs/data.yaml`` must agree with them (a test checks), so a default is
written once. The checks run when a ``DataSettings`` is made, and ``pipeline.config`` reports them
under the config keys. No torch here: the config module imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from pipeline.retry import RetryPolicy

MAX_TARGET_POSITIONS = 448  # Whisper's decoder positions: the longest label sequence a model takes
ON_ERROR = ("skip", "raise")
SOURCE_KEY = "__source__"  # the sample field naming the source it came from (missing: DEFAULT_SOURCE)
DEFAULT_SOURCE = "default"  # the one source of a single-source run


@dataclass(frozen=True)
class Source:
    """One training source: its shard URLs, its weight in the mix, and the caption prefix that tells
    the decoder which source's style to write (``pipeline.collate``: the prompt)."""

    name: str
    shards: str
    weight: float = 1.0
    prefix: str = ""


@dataclass(frozen=True)
class SpecAugment:
    """SpecAugment on the log-mel in the loader: masks per clip, widths in frames / mel bins."""

    time_masks: int = 2
    time_width: int = 50
    freq_masks: int = 2
    freq_width: int = 10


@dataclass(frozen=True)
class DataSettings:
    """How one rank reads and batches a split (pipeline.stream module doc for the plan)."""

    batch_size: int = 16
    train: bool = True  # shuffle, draw one caption per visit, SpecAugment
    seed: int = 0
    infinite: bool = False  # epoch after epoch (training by max_steps)
    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = False
    persistent_workers: bool = False
    shuffle_buffer: int = 500  # samples per shuffle block
    interleave: int = 4  # cursors a training worker reads its range with
    on_error: str = "skip"  # skip | raise: a damaged shard or sample
    max_skip_fraction: float = 0.05  # more skipped samples than this share of a rank's epoch raise
    verify: bool = False  # check local shards against index.json's sha256 before reading them
    max_label_tokens: int = MAX_TARGET_POSITIONS
    spec_augment: SpecAugment | None = None
    retry: RetryPolicy | None = None  # http(s) and fsspec reads: retries, deadline (None: retry.DEFAULT_POLICY)
    prefixes: tuple[tuple[str, str], ...] = ()  # (source name, caption prefix): the decoder prompt per source
    normalize_captions: bool = False  # train on lower-cased captions without punctuation (collate.normalize_caption)

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("\n".join(problems))

    def problems(self) -> list[str]:
        """``"name=value: why"`` for every setting out of range."""
        out = [f"{name}={getattr(self, name)!r}: must be at least 1"
               for name in ("batch_size", "shuffle_buffer", "interleave", "max_label_tokens", "prefetch_factor")
               if getattr(self, name) < 1]
        out += [f"{name}={getattr(self, name)!r}: must be at least 0"
                for name in ("seed", "num_workers") if getattr(self, name) < 0]
        if self.on_error not in ON_ERROR:
            out.append(f"on_error={self.on_error!r}: choose from {ON_ERROR}")
        if not (math.isfinite(self.max_skip_fraction) and 0 <= self.max_skip_fraction <= 1):
            out.append(f"max_skip_fraction={self.max_skip_fraction!r}: must be within [0, 1]")
        names = [name for name, _ in self.prefixes]
        if len(set(names)) < len(names):
            out.append(f"prefixes={self.prefixes!r}: a source is named twice")
        if self.spec_augment is not None:
            out += [f"spec_augment.{f.name}={getattr(self.spec_augment, f.name)!r}: must be at least 0"
                    for f in fields(SpecAugment) if getattr(self.spec_augment, f.name) < 0]
        return out
