"""Packer throughput and shard size, side by side with the seed's per-clip path, in one run.

    python bench/pack.py [--clips 240] [--min-seconds 1 --max-seconds 30] [--corpus DIR]

Rows (all over the same generated corpus: wav/flac/ogg/mp3, 16/22.05/44.1/48 kHz, mono and stereo):
- seed, extractor default: ``librosa.load`` + ``librosa.resample`` + ``WhisperFeatureExtractor``
  as the seed called it (transformers 5 runs a torch STFT on the 30-s padded clip), one process;
- seed, numpy extractor: the same with the extractor's numpy path (what older transformers ran);
- floor: decoding and resampling only (``pipeline.features.decode_audio``), one process;
- ``python -m shard_tools.pack --workers 1`` and ``--workers N``: the packer end to end, as a user runs
  it, Python start-up and writing the shards included.
Then shard bytes per audio second against the same audio stored as 16-kHz mono FLAC.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile
from transformers import WhisperFeatureExtractor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seed import seed_features  # noqa: E402
from pipeline.features import decode_audio  # noqa: E402
from shard_tools.synth import make_corpus  # noqa: E402

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


def audio_files(corpus: Path) -> list[str]:
    return sorted(str(p) for p in corpus.rglob("*") if p.suffix in AUDIO_SUFFIXES)


def time_per_clip(fn, files: list[str]) -> float:
    start = time.perf_counter()
    for path in files:
        fn(path)
    return time.perf_counter() - start


def run_packer(corpus: Path, out: Path, workers: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "shard_tools.pack", str(corpus), "--out", str(out),
                    "--workers", str(workers)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def flac_bytes_16k(files: list[str]) -> int:
    total = 0
    for path in files:
        audio, _ = decode_audio(path)
        buf = io.BytesIO()
        soundfile.write(buf, audio, 16000, format="FLAC", subtype="PCM_16")
        total += len(buf.getvalue())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=240)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--corpus", type=Path, help="reuse or create the corpus here")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_pack_"))
    corpus = args.corpus or work / "corpus"
    if not (corpus / "train").is_dir():
        make_corpus(corpus, train=args.clips, validation=0, min_seconds=args.min_seconds,
                    max_seconds=args.max_seconds)
    files = audio_files(corpus)
    audio_seconds = sum(soundfile.info(p).duration for p in files)
    n = len(files)
    print(f"corpus: {n} clips, {audio_seconds / 3600:.2f} h, {audio_seconds / n:.1f} s/clip on average; "
          f"{os.cpu_count()} cores; torch threads 1 for the single-process rows")

    import torch

    torch.set_num_threads(1)  # the single-process rows measure one core
    extractor = WhisperFeatureExtractor(feature_size=80)
    seed_features(files[0], extractor)  # warm-up: imports, filter banks
    rows = [
        ("seed: librosa + extractor (default call)", 1, time_per_clip(lambda p: seed_features(p, extractor), files)),
        ("seed: librosa + extractor (numpy path)", 1,
         time_per_clip(lambda p: seed_features(p, extractor, numpy=True), files)),
        ("floor: decode + resample only", 1, time_per_clip(decode_audio, files)),
        ("shard_tools.pack --workers 1", 1, run_packer(corpus, work / "out1", 1)),
        (f"shard_tools.pack --workers {args.workers}", args.workers, run_packer(corpus, work / "outN", args.workers)),
    ]
    seed_core = n / rows[0][2]
    floor_s = rows[2][2]
    print("\n| path | processes | seconds | clips/s | clips/s per core | vs seed per core | vs floor |")
    print("|---|---|---|---|---|---|---|")
    for name, procs, seconds in rows:
        per_core = n / seconds / procs
        print(f"| {name} | {procs} | {seconds:.1f} | {n / seconds:.1f} | {per_core:.1f} | "
              f"{per_core / seed_core:.2f}x | {seconds * procs / floor_s:.2f}x |")

    shard_bytes = sum(p.stat().st_size for p in (work / "out1").rglob("*.tar"))
    flac = flac_bytes_16k(files)
    print("\n| storage | bytes | KB per audio second | vs 16-kHz FLAC |\n|---|---|---|---|")
    print(f"| shards (float16 log-mel, valid frames) | {shard_bytes} | {shard_bytes / audio_seconds / 1000:.1f} | "
          f"{shard_bytes / flac:.2f}x |")
    print(f"| 16-kHz mono FLAC of the same audio | {flac} | {flac / audio_seconds / 1000:.1f} | 1.00x |")
    identical = all((work / "out1" / p.relative_to(work / "outN")).read_bytes() == p.read_bytes()
                    for p in (work / "outN").rglob("*.tar"))
    print(f"\nshards byte-identical for --workers 1 and {args.workers}: {identical}")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
