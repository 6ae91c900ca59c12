"""A synthetic audio-captioning corpus whose captions can be learnt from the sound.

    python -m shard_tools.synth ROOT --train 480 --validation 64

Clips of four sound kinds at two pitches and two durations, captioned with all three, in the folder
layout the packer reads; ``write_mel_shards`` / ``write_uniform_shards`` write log-mel shards directly
for the loader's tests and benchmarks. Details: docs/packing.md, "A synthetic corpus".
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile
from tqdm import tqdm

from shard_tools.fileio import write_json
from shard_tools.shard_format import INDEX_FILE, Index, IndexEntry

KINDS = ("tone", "rising chirp", "noise", "click train")
PITCHES = {"low": (150.0, 400.0), "high": (1500.0, 3500.0)}  # Hz ranges a clip's pitch is drawn from
DURATIONS = {"short": (1.0, 1.8), "long": (2.6, 3.5)}  # seconds
# (suffix, soundfile format, subtype): the formats the packer must read.
FORMATS = ((".wav", "WAV", "PCM_16"), (".flac", "FLAC", "PCM_16"), (".ogg", "OGG", "VORBIS"),
           (".mp3", "MP3", "MPEG_LAYER_III"))
SAMPLE_RATES = (16000, 22050, 44100, 48000)
STYLES = ("captions", "keywords")
KEYWORDS = {"tone": "tone", "rising chirp": "chirp", "noise": "noise", "click train": "clicks"}
VALIDATION_SEED_OFFSET = 1_000_003  # the validation split's seed: the training seed + this, unless given


def render(kind: str, pitch_hz: float, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One mono clip ``[samples]`` float32 in [-1, 1]."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    if kind == "tone":
        wave = np.sin(2 * np.pi * pitch_hz * t)
    elif kind == "rising chirp":  # an octave and a half upwards over the clip
        freq = pitch_hz * (2 ** (1.5 * t / seconds))
        wave = np.sin(2 * np.pi * np.cumsum(freq) / sr)
    elif kind == "noise":  # white noise through a one-pole filter centred on the pitch band
        white = rng.standard_normal(n)
        alpha = np.exp(-2 * np.pi * pitch_hz / sr)
        low = scipy.signal.lfilter([1 - alpha], [1, -alpha], white)  # y[i] = a*y[i-1] + (1-a)*x[i]
        wave = low if pitch_hz < 1000 else white - low
        wave /= np.abs(wave).max() + 1e-9
    elif kind == "click train":  # short decaying bursts of the pitch, 8 per second
        wave = np.zeros(n)
        burst = np.sin(2 * np.pi * pitch_hz * t[: sr // 50]) * np.exp(-t[: sr // 50] * 300)
        for start in range(0, n - len(burst), sr // 8):
            wave[start:start + len(burst)] += burst
    else:
        raise ValueError(f"unknown sound kind {kind!r}")
    fade = min(n // 10, sr // 100)  # 10-ms fades: no click at the edges
    envelope = np.ones(n)
    envelope[:fade] = np.linspace(0, 1, fade)
    envelope[n - fade:] = np.linspace(1, 0, fade)
    return (0.5 * wave * envelope + 0.005 * rng.standard_normal(n)).astype(np.float32)


def captions_for(kind: str, pitch: str, duration: str, style: str = "captions") -> list[str]:
    """Two references per clip, as captioning corpora have several (Clotho has five); ``keywords``:
    one terse keyword line."""
    if style == "keywords":
        return [f"{KEYWORDS[kind]}, {pitch}, {duration}"]
    other = {"low": "low-pitched", "high": "high-pitched"}[pitch]
    return [f"a {duration} {pitch} {kind}", f"a {other} {kind}, {duration}"]


def make_clip(index: int, seed: int, min_seconds: float | None, max_seconds: float | None, style: str = "captions"):
    """Deterministic clip ``index``: (mono audio, sample rate, channels, format, captions); the audio
    does not depend on ``style``."""
    rng = np.random.default_rng([seed, index])
    kind = KINDS[rng.integers(len(KINDS))]
    pitch = ("low", "high")[rng.integers(2)]
    duration = ("short", "long")[rng.integers(2)]
    lo, hi = DURATIONS[duration] if min_seconds is None else (min_seconds, max_seconds)
    seconds = float(rng.uniform(lo, hi))
    sr = SAMPLE_RATES[rng.integers(len(SAMPLE_RATES))]
    audio = render(kind, float(rng.uniform(*PITCHES[pitch])), seconds, sr, rng)
    channels = int(rng.integers(1, 3))
    fmt = FORMATS[rng.integers(len(FORMATS))]
    return audio, sr, channels, fmt, captions_for(kind, pitch, duration, style)


def write_split(directory: Path, count: int, seed: int, min_seconds=None, max_seconds=None,
                desc: str = "", style: str = "captions") -> int:
    directory.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(count), desc=desc or f"synth {directory.name}", unit="clip", leave=False):
        audio, sr, channels, (suffix, fmt, subtype), captions = make_clip(i, seed, min_seconds, max_seconds, style)
        data = audio if channels == 1 else np.stack([audio, 0.8 * audio], axis=1)  # [samples, channels]
        soundfile.write(str(directory / f"{i:05d}{suffix}"), data, sr, format=fmt, subtype=subtype)
        (directory / f"{i:05d}.json").write_text(json.dumps({"text": captions}))
    return count


def make_corpus(root: str | Path, train: int = 480, validation: int = 64, seed: int = 0,
                min_seconds: float | None = None, max_seconds: float | None = None, style: str = "captions",
                validation_seed: int | None = None) -> Path:
    """Write ``root/train`` and ``root/validation``; the splits use different seeds (no shared clip)."""
    root = Path(root)
    write_split(root / "train", train, seed, min_seconds, max_seconds, style=style)
    if validation:
        validation_seed = seed + VALIDATION_SEED_OFFSET if validation_seed is None else validation_seed
        write_split(root / "validation", validation, validation_seed, min_seconds, max_seconds, style=style)
    return root


# ------------------------------------------------------------------------- shards, without the packer


def mel_sample_bytes(key: str, frames: int, captions: list[str], n_mels: int = 80, seed: int = 0,
                     pad_value: float = -0.5) -> dict[str, bytes]:
    """The two members of one sample: a float16 ``[n_mels, frames]`` mel and its JSON."""
    rng = np.random.default_rng(seed)
    mel = rng.uniform(-1, 1, size=(n_mels, frames)).astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, mel, allow_pickle=False)
    meta = {"captions": captions, "source": f"{key}.wav", "seconds": frames / 100, "orig_sample_rate": 16000,
            "pad_value": pad_value, "truncated": False, "extra": {}}
    return {f"{key}.mel.npy": buf.getvalue(), f"{key}.json": json.dumps(meta).encode()}


def _write_tar(path: Path, members: dict[str, bytes], samples: int, seconds: float) -> IndexEntry:
    """A tar of ``members`` in order; its index.json entry."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    return IndexEntry(path.name, samples, seconds, len(data), hashlib.sha256(data).hexdigest())


def _write_index(directory: Path, entries: list[IndexEntry], n_mels: int) -> None:
    write_json(directory / INDEX_FILE, Index(directory.name, n_mels, entries).to_dict())


def write_mel_shards(directory: Path, sizes: list[int], n_mels: int = 80, captions_per_clip: int = 1,
                     prefix: str = "s", index: bool = True, caption=None) -> list[str]:
    """Shards ``000.tar …`` with ``sizes[i]`` samples each, keys ``{prefix}{shard}_{i}``, and index.json.

    Frames vary per sample (5–40) so padding is exercised; captions are ``"caption {key} {j}"``, or
    ``caption(key, j)``. Returns the shard paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths, entries = [], []
    counter = 0
    for s, size in enumerate(sizes):
        path, members = directory / f"{s:03d}.tar", {}
        for i in range(size):
            key = f"{prefix}{s:03d}_{i:04d}"
            caps = [caption(key, j) if caption else f"caption {key} {j}" for j in range(captions_per_clip)]
            members.update(mel_sample_bytes(key, 5 + counter % 36, caps, n_mels, seed=counter))
            counter += 1
        entries.append(_write_tar(path, members, size, float(size)))
        paths.append(str(path))
    if index:
        _write_index(directory, entries, n_mels)
    return paths


def write_uniform_shards(folder: Path, samples: int, frames: int, per_shard: int = 250) -> None:
    """``samples`` clips of ``frames`` frames each (keys ``clip{i:06d}``), ``per_shard`` to a shard,
    and index.json: the loader benchmarks' data."""
    entries = []
    for s in range(-(-samples // per_shard)):
        members, clips = {}, range(s * per_shard, min(samples, (s + 1) * per_shard))
        for i in clips:
            members.update(mel_sample_bytes(f"clip{i:06d}", frames, [f"a sound number {i}"], seed=i))
        entries.append(_write_tar(folder / f"{s:03d}.tar", members, len(clips), len(clips) * frames / 100))
    _write_index(folder, entries, 80)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--validation", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, help="draw durations uniformly from this range "
                        "instead of the short/long classes (benchmark corpora)")
    parser.add_argument("--max-seconds", type=float)
    parser.add_argument("--style", choices=STYLES, default="captions",
                        help="captions: 'a short high rising chirp' and a paraphrase; keywords: 'chirp, high, short'")
    parser.add_argument("--validation-seed", type=int, help=f"seed of the validation clips (default: --seed + "
                        f"{VALIDATION_SEED_OFFSET}); the same value gives the same clips in another --style")
    args = parser.parse_args(argv)
    if (args.min_seconds is None) != (args.max_seconds is None):
        parser.error("--min-seconds and --max-seconds go together")
    make_corpus(args.root, args.train, args.validation, args.seed, args.min_seconds, args.max_seconds, args.style,
                args.validation_seed)
    print(f"wrote {args.train} train and {args.validation} validation clips under {args.root}")


if __name__ == "__main__":
    main()
