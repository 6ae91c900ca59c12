"""The typed settings of the shard loader and the collator: one object, one home for every default.

``make_loader`` and ``Collator`` take a ``DataSettings``; its fields made with ``key`` (a default and a
one-line meaning) are the ``data_config`` keys, under the same names (``pipeline.config.DataConfig``),
their policies (``SpecAugment``, ``RetryPolicy``) as nested sections. No torch here: the config
imports it. Adding a knob: docs/DESIGN.md, "What a maintainer touches".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from shard_tools.retry import RetryPolicy
from shard_tools.shard_format import MAX_TARGET_POSITIONS

ON_ERROR = ("skip", "raise")
SOURCE_KEY = "__source__"  # every sample dict the stream hands the collator names its source here
DEFAULT_SOURCE = "default"  # the name of the one source of a plain train_shards / --shards run


def key(default: Any, meaning: str, toggle: bool = False) -> Any:
    """A field that is a config key, with its one-line meaning (``train_stream.py --help`` prints it).
    ``toggle`` on a policy that may be None: its config section gets an ``enabled`` key, off gives None."""
    metadata = {"help": meaning, "toggle": toggle}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SpecAugment:
    """SpecAugment on the log-mel in the loader: masks per clip, widths in frames / mel bins."""

    time_masks: int = key(2, "time masks per clip")
    time_width: int = key(50, "widest time mask, in frames")
    freq_masks: int = key(2, "frequency masks per clip")
    freq_width: int = key(10, "widest frequency mask, in mel bins")


@dataclass(frozen=True)
class Source:
    """One training source of a mixed stream (docs/streaming.md, 'Sources and mixing'): its shards (any
    form ``expand_urls`` takes), its weight (share of every epoch, relative to the others') and the
    caption prefix its samples are trained with ("": none)."""

    name: str
    shards: str
    weight: float = 1.0
    prefix: str = ""

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("\n".join(problems))

    def problems(self) -> list[str]:
        """``"name=value: why"`` for every field out of range."""
        out = []
        if not (isinstance(self.name, str) and self.name.strip()):
            out.append(f"name={self.name!r}: must be a non-empty string")
        if not self.shards:
            out.append(f"shards={self.shards!r}: must name shard URLs")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not (math.isfinite(self.weight) and self.weight > 0):
            out.append(f"weight={self.weight!r}: must be a finite number > 0")
        if not isinstance(self.prefix, str):
            out.append(f"prefix={self.prefix!r}: must be a string")
        return out


def source_prefixes(sources: list[Source]) -> tuple[tuple[str, str], ...]:
    """``DataSettings.prefixes`` of ``sources``: (name, prefix) of those that have one."""
    return tuple((s.name, s.prefix) for s in sources if s.prefix)


@dataclass(frozen=True)
class DataSettings:
    """How one rank reads and batches a split (docs/streaming.md for the plan). The fields
    made with ``key`` are ``data_config`` keys; the others are the run's (trainer_config, the loop)."""

    batch_size: int = 16
    train: bool = True  # shuffle, draw one caption per visit, SpecAugment
    seed: int = 0
    infinite: bool = False  # epoch after epoch (training by max_steps)
    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = False
    persistent_workers: bool = False
    shuffle_buffer: int = key(500, "samples held for shuffling within a worker's shards")
    interleave: int = 4  # cursors a training worker reads its range with
    bucket_pool_batches: int = key(0, "length bucketing (training and evaluation): pools of this many batches, "
                                   "each sorted by clip length, cut into batches and those shuffled (0: off)")
    on_error: str = key("skip", f"{' | '.join(ON_ERROR)}: what a damaged shard or sample does")
    max_skip_fraction: float = key(0.05, "more skipped samples than this fraction of the plan stops the run")
    verify: bool = key(False, "check local shards against index.json's sha256 first")
    max_label_tokens: int = key(MAX_TARGET_POSITIONS, "longest label row, in tokens: 3 task tokens, the caption "
                                "prefix, the caption and its end token; longer captions are cut (at most "
                                f"{MAX_TARGET_POSITIONS}, the decoder's positions)")
    normalize_captions: bool = key(False, "train on the captions lower-cased, without punctuation")
    spec_augment: SpecAugment | None = key(None, "SpecAugment in the data loader (on the log-mel, per clip; "
                                           "training batches only)", toggle=True)
    # http(s) and fsspec reads; None: retry.DEFAULT_POLICY (the config always gives its own)
    retry: RetryPolicy | None = key(None, "retries of one http(s)/fsspec shard read (5xx, reset, timeout), "
                                    "resuming at the byte reached")
    prefixes: tuple[tuple[str, str], ...] = ()  # (source name, caption prefix): the collator's per-source prompt
    full_batches: bool = False  # fill a short batch with padding samples up to batch_size: one shape for torch.compile

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
                for name in ("seed", "num_workers", "bucket_pool_batches") if getattr(self, name) < 0]
        if self.max_label_tokens > MAX_TARGET_POSITIONS:  # the decoder row, task tokens and prefix included
            out.append(f"max_label_tokens={self.max_label_tokens!r}: must be at most {MAX_TARGET_POSITIONS}, "
                       f"the decoder's positions")
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
