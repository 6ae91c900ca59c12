"""Batches from decoded samples: padded log-mels, labels, captions, padding marks.

Batches stay compact (cut after the longest clip, plus ``pad_values``) up to the device, where
``expand_features`` pads them to 3000 frames with each clip's ``pad_value``. Labels omit
``<|startoftranscript|>`` and are -100 by caption length; a source's prefix is forced after the task
tokens (``prompt_ids``). Every rule and why: docs/streaming.md, "Batches (collate)".
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import unicodedata
import warnings

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.data_settings import DEFAULT_SOURCE, SOURCE_KEY, DataSettings
from shard_tools.features import LOG_FLOOR, pad_mel
from shard_tools.shard_format import MEL_MEMBER, N_FRAMES

IGNORE_INDEX = -100  # ignored by torch's cross-entropy and by the HF Whisper loss
SILENCE_PAD_VALUE = (LOG_FLOOR + 4.0) / 4.0  # the extractor's value for an all-silent window (-1.5)
# Label widths a batch is rounded up to (docs/streaming.md#batches-collate): each at most 1.5x the
# one before, so a batch pays at most 1.5x its decoder positions (little beside the encoder's 1500),
# and a run meets at most len(LABEL_WIDTHS) + 1 widths (the +1: max_label_tokens), where multiples
# of 8 would allow 56.
LABEL_WIDTHS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384)


def label_width(longest: int, limit: int) -> int:
    """The label width of a batch whose longest row is ``longest`` tokens (at most ``limit``):
    the next of ``LABEL_WIDTHS``, or ``limit`` past them or below the next."""
    i = bisect.bisect_left(LABEL_WIDTHS, longest)
    return min(LABEL_WIDTHS[i], limit) if i < len(LABEL_WIDTHS) else limit


def pad_sample(reason: str) -> dict:
    """A padding sample: ``reason`` is "rank" (equal batch counts), "skip" (replaces a lost one) or
    "fill" (fills a short batch, ``full_batches``)."""
    return {"__key__": "", "__pad__": reason}


def _hash64(*parts) -> int:
    """A stable 64-bit hash of ``parts`` (Python's ``hash`` changes with PYTHONHASHSEED)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def caption_index(seed: int, epoch: int, key: str, count: int) -> int:
    """Which of ``count`` captions training uses for ``key`` in ``epoch``."""
    return _hash64("caption", seed, epoch, key) % count


def normalize_caption(text: str) -> str:
    """Lower-case, punctuation (Unicode category P) dropped, except dashes, which separate words
    (``"Rock-and-roll!"`` -> ``"rock and roll"``), whitespace collapsed."""
    kept = (" " if unicodedata.category(c) == "Pd" else "" if unicodedata.category(c).startswith("P") else c
            for c in text.lower())
    return " ".join("".join(kept).split())


def text_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids of each of ``texts`` read as plain text, the one home of caption and prefix
    tokenization: a control token's spelling (``<|endoftext|>``, ``<|0.00|>``) in a scraped caption
    stays the characters it is, as openai-whisper's ``encode_ordinary`` reads it. The backend's
    pre-tokenizer and BPE model are used directly: ``split_special_tokens`` splits only tokens marked
    special, and the Hub's Whisper tokenizers add their 1,501 timestamps as non-special tokens."""
    backend = tokenizer.backend_tokenizer
    normalize = backend.normalizer.normalize_str if backend.normalizer else str  # Whisper's have none
    split, bpe = backend.pre_tokenizer.pre_tokenize_str, backend.model.tokenize
    return [[token.id for piece, _ in split(normalize(text)) for token in bpe(piece)] for text in texts]


def prompt_ids(tokenizer, prefix: str) -> list[int]:
    """The ids of ``prefix``, forced after the task tokens (the rule: docs/streaming.md#batches-collate)."""
    prefix = prefix.strip()
    return text_ids(tokenizer, [prefix])[0] if prefix else []


class Collator:
    """``Collator(tokenizer, settings)(samples, epoch)`` -> batch dict (docs/streaming.md#batches-collate):
    ``input_features`` float16 ``[B, n_mels, 3000]``, ``labels`` and ``decoder_input_ids`` int64
    ``[B, T]``, ``keys``, ``captions``, ``sources``, ``is_pad`` bool ``[B]``, ``meta``,
    ``longest_caption_tokens`` int (0 for padding only); ``compact`` gives
    the form loaders hand over. It reads ``train``, ``seed``, ``max_label_tokens``, ``spec_augment``,
    ``prefixes``, ``normalize_captions``, ``full_batches`` and ``batch_size`` of the settings; keyword
    ``changes`` replace fields of ``settings`` (or of the defaults)."""

    def __init__(self, tokenizer, settings: DataSettings | None = None, n_mels: int = 80,
                 n_frames: int = N_FRAMES, **changes):
        settings = dataclasses.replace(settings or DataSettings(), **changes)
        self.tokenizer = tokenizer
        self.train, self.seed = settings.train, settings.seed
        self.max_label_tokens = settings.max_label_tokens
        self.spec_augment = settings.spec_augment
        self.normalize = settings.normalize_captions
        self.full_batches, self.batch_size = settings.full_batches, settings.batch_size
        self.n_mels, self.n_frames = n_mels, n_frames
        self.task_ids = list(tokenizer.prefix_tokens)  # <|startoftranscript|><|en|><|translate|><|notimestamps|>
        self.end_id = tokenizer.eos_token_id  # <|endoftext|>
        self.prompts = {name: prompt_ids(tokenizer, prefix) for name, prefix in settings.prefixes}
        task = len(self.task_ids) - 1  # in the labels: <|startoftranscript|> is the model's own
        room = self.max_label_tokens - task - 2  # a caption token and the end token follow the prefix
        for name, ids in self.prompts.items():
            if len(ids) > room:
                where = ("data_config.caption_prefix" if name == DEFAULT_SOURCE
                         else f"the prefix of data_config.train_sources '{name}'")
                raise ConfigError(f"{where} is {len(ids)} tokens: at most {room} fit, leaving a caption "
                                  f"token and the end token within max_label_tokens={self.max_label_tokens} "
                                  f"({task} task tokens before it)")

    def prompt(self, source: str) -> list[int]:
        """The prefix ids forced after the task tokens for samples of ``source`` ([] for none)."""
        return self.prompts.get(source, [])

    def __call__(self, samples: list[dict], epoch: int = 0) -> dict:
        batch = self.compact(samples, epoch)
        features = expand_features(batch, self.n_frames)
        del batch["pad_values"]
        return {**batch, "input_features": features}

    def compact(self, samples: list[dict], epoch: int = 0) -> dict:
        """The batch with ``input_features`` cut after the longest clip, ``[B, n_mels, max_frames]``,
        plus ``"pad_values"`` float32 ``[B]``; ``expand_features`` makes the full features where the
        batch is used. Padding before the process boundary would multiply the bytes through the
        worker queue by 3000 / max_frames (measured here: 500-750 padded samples/s through the
        queue alone, ~4,000/s at 500 frames)."""
        if not samples:
            raise ValueError("cannot collate an empty batch")
        if self.full_batches and len(samples) < self.batch_size:
            samples = [*samples, *[pad_sample("fill")] * (self.batch_size - len(samples))]
        is_pad = [bool(s.get("__pad__")) for s in samples]
        real = [s for s, pad in zip(samples, is_pad) if not pad]
        metas = [s["json"] for s in real]
        keys = [s["__key__"] for s in real]
        sources = [s.get(SOURCE_KEY, DEFAULT_SOURCE) for s in samples]
        features, pad_values = self._features(samples, is_pad, epoch)  # [B, n_mels, max_frames], [B]
        frames = [0 if pad else _mel(s).shape[1] for s, pad in zip(samples, is_pad)]  # each clip's valid frames
        real_sources = [source for source, pad in zip(sources, is_pad) if not pad]
        labels, decoder_input_ids, longest = self._labels(metas, keys, real_sources, is_pad, epoch)  # [B, T] int64 each
        real_iter = iter(zip(keys, metas))
        rows = [("", {}) if pad else next(real_iter) for pad in is_pad]
        return {
            "input_features": features,
            "pad_values": pad_values,
            "labels": labels,
            "decoder_input_ids": decoder_input_ids,
            "keys": [key for key, _ in rows],
            "captions": [list(meta.get("captions", [])) for _, meta in rows],
            "sources": sources,
            "is_pad": torch.tensor(is_pad, dtype=torch.bool),  # [B]
            "frames": torch.tensor(frames, dtype=torch.int64),  # [B]: a window shorter than a clip cuts it
            "meta": [meta for _, meta in rows],
            "longest_caption_tokens": longest,
        }

    # -------------------------------------------------------------------------------- features

    def _features(self, samples: list[dict], is_pad: list[bool], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Built in numpy, wrapped once: small torch CPU ops use intra-op threads, which cost ~100x more
        # than the copy itself when the cores are busy (measured here: 11 ms vs 0.09 ms per clip).
        mels = [None if pad else _mel(s) for s, pad in zip(samples, is_pad)]
        n_mels = {m.shape[0] for m in mels if m is not None}
        if len(n_mels) > 1:
            keys = [s["__key__"] for s in samples]
            raise ValueError(f"samples in one batch have different n_mels {sorted(n_mels)}: {keys}")
        n_mels = n_mels.pop() if n_mels else self.n_mels
        width = max((m.shape[1] for m in mels if m is not None), default=1)
        out = np.empty((len(samples), n_mels, width), dtype=np.float16)  # [B, n_mels, max_frames]
        pad_values = np.full(len(samples), SILENCE_PAD_VALUE, dtype=np.float32)  # [B]
        for i, (sample, mel) in enumerate(zip(samples, mels)):
            if mel is None:
                out[i] = SILENCE_PAD_VALUE
                continue
            pad_values[i] = float(sample["json"]["pad_value"])
            out[i] = pad_mel(mel, pad_values[i], width)
            if self.train and self.spec_augment:  # masks on the tail would only write pad_value again
                self._mask(out[i], mel.shape[1], pad_values[i], _hash64("specaug", self.seed, epoch, sample["__key__"]))
        return torch.from_numpy(out), torch.from_numpy(pad_values)

    def _mask(self, mel: np.ndarray, frames: int, fill: float, seed: int) -> None:
        """SpecAugment in place on ``mel [n_mels, n_frames]``: time masks within the valid frames."""
        rng = np.random.default_rng(seed)
        n_mels = mel.shape[0]
        opts = self.spec_augment
        for _ in range(opts.time_masks):
            width = int(rng.integers(0, min(opts.time_width, frames) + 1))
            start = int(rng.integers(0, frames - width + 1))
            mel[:, start:start + width] = fill
        for _ in range(opts.freq_masks):
            width = int(rng.integers(0, min(opts.freq_width, n_mels) + 1))
            start = int(rng.integers(0, n_mels - width + 1))
            mel[start:start + width, :] = fill

    # ---------------------------------------------------------------------------------- labels

    def _caption(self, meta: dict, key: str, epoch: int) -> str:
        captions = meta["captions"]
        caption = captions[caption_index(self.seed, epoch, key, len(captions))] if self.train and len(captions) > 1 \
            else captions[0]
        return normalize_caption(caption) if self.normalize else caption

    def _labels(self, metas: list[dict], keys: list[str], sources: list[str], is_pad: list[bool],
                epoch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(labels, decoder_input_ids, longest)``, the first two ``[B, T]``: the labels with the prompt's
        positions -100, the decoder inputs ``<|startoftranscript|>`` + the whole row but its last
        token; ``longest``: the longest caption's tokens after the task tokens and the prefix, the
        end token included (0 for no caption)."""
        prompts = [self.prompt(source) for source in sources]
        texts = [(" " if prompt else "") + self._caption(meta, key, epoch)
                 for meta, key, prompt in zip(metas, keys, prompts)]
        task = len(self.task_ids) - 1  # task tokens after <|startoftranscript|>, which the row drops
        rows, given = [], []
        for key, caption, prompt in zip(keys, text_ids(self.tokenizer, texts), prompts):
            row = self.task_ids[1:] + prompt + caption + [self.end_id]  # the model prepends decoder_start itself
            if len(row) > self.max_label_tokens:
                warnings.warn(f"caption of '{key}' has {len(row)} label tokens; cut to max_label_tokens="
                              f"{self.max_label_tokens}", stacklevel=3)
                row = row[:self.max_label_tokens - 1] + row[-1:]  # keep <|endoftext|>: it teaches stopping
            rows.append(row)
            given.append(len(prompt))
        width = label_width(max((len(r) for r in rows), default=1), self.max_label_tokens)
        labels = np.full((len(is_pad), width), IGNORE_INDEX, dtype=np.int64)  # [B, T]
        inputs = np.full((len(is_pad), width), self.tokenizer.pad_token_id, dtype=np.int64)  # [B, T]
        inputs[:, 0] = self.task_ids[0]
        real_rows = iter(zip(rows, given))
        for i, pad in enumerate(is_pad):
            if not pad:
                row, prompt = next(real_rows)
                labels[i, :len(row)] = row
                labels[i, task:task + prompt] = IGNORE_INDEX  # the prefix is given, not predicted
                inputs[i, 1:len(row)] = row[:-1]
        longest = max((len(row) - task - prompt for row, prompt in zip(rows, given)), default=0)
        return torch.from_numpy(labels), torch.from_numpy(inputs), longest


def expand_features(batch: dict, n_frames: int = N_FRAMES, device=None,
                    dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The full features ``[B, n_mels, n_frames]`` of a ``Collator.compact`` batch, each clip
    continued with its own pad value, or cut after ``n_frames`` (an encoder window shorter than the
    batch's longest clip; ``batch`` is left as it is), built on ``device`` (default: where the batch
    is; on a GPU this costs microseconds) in ``dtype``."""
    compact = batch["input_features"][..., :n_frames].to(device, non_blocking=True)  # [B, n_mels, max_frames]
    # rounded to the features' float16, as a stored clip's own frames are: the same batch whatever dtype
    pad_values = batch["pad_values"].to(compact.device, compact.dtype, non_blocking=True)  # [B]
    count, n_mels, width = compact.shape
    # filled whole from the pad values, then the clips written over: a plain fill, where assigning
    # the tail alone is a broadcast copy, the slower one on a CPU
    out = pad_values.to(dtype)[:, None, None].expand(count, n_mels, n_frames).contiguous()  # [B, n_mels, 3000]
    out[:, :, :width] = compact
    return out


def _mel(sample: dict) -> np.ndarray:
    mel = sample["mel"] if "mel" in sample else sample[MEL_MEMBER]
    if isinstance(mel, torch.Tensor):
        mel = mel.cpu().numpy()
    if mel.ndim != 2:
        raise ValueError(f"mel of '{sample['__key__']}' has shape {mel.shape}, expected [n_mels, frames]")
    return mel.astype(np.float16, copy=False)
