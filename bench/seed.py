"""The seed's per-clip feature path, kept verbatim as the baseline every benchmark compares with.

The seed computed features on the fly for each item: ``librosa.load`` (soundfile, then
``librosa.resample`` to 16 kHz with soxr_hq) and ``WhisperFeatureExtractor`` on the clip, which pads
it to 30 s. In transformers 5 the extractor's ``__call__`` runs a torch STFT when torch is installed;
``numpy=True`` calls its numpy path (``_np_extract_fbank_features``), what older releases ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import librosa
import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from shard_tools.shard_format import AUDIO_SUFFIXES, SAMPLE_RATE


def seed_features(path: str, extractor: WhisperFeatureExtractor, numpy: bool = False) -> np.ndarray:
    """``[n_mels, 3000]`` float32 features of one audio file, as the seed computed them."""
    audio, sr = librosa.load(path, sr=None)
    if sr != SAMPLE_RATE:
        audio = librosa.resample(audio, orig_sr=sr, target_sr=SAMPLE_RATE)
    if numpy:  # the extractor pads with zeros to 30 s, then runs its numpy STFT
        padded = np.zeros(extractor.n_samples, dtype=np.float32)
        padded[: len(audio)] = audio[: extractor.n_samples]
        return extractor._np_extract_fbank_features(padded[None], "cpu")[0]
    return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]




def audio_files(corpus: Path) -> list[Path]:
    """The audio files under a generated corpus (``shard_tools.synth``), sorted."""
    return sorted(p for p in Path(corpus).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)


class SeedDataset(torch.utils.data.Dataset):
    """The seed's map-style dataset: each item decoded, resampled and run through the extractor.

    Items are ``{"path", "input_features" [n_mels, 3000]}``, plus ``"labels"`` (the tokenizer's ids
    without <|startoftranscript|>, of the first caption in the clip's JSON) when a tokenizer is given.
    """

    def __init__(self, files: list[Path], extractor: WhisperFeatureExtractor, tokenizer=None):
        self.files, self.extractor, self.tokenizer = files, extractor, tokenizer

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        item = {"path": str(path), "input_features": seed_features(str(path), self.extractor)}
        if self.tokenizer is not None:
            caption = json.loads(path.with_suffix(".json").read_text())["text"][0]
            item["labels"] = self.tokenizer(caption).input_ids[1:]
        return item
