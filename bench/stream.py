"""Loader throughput: padded, tokenized batches from shards against the seed's on-the-fly loader.

    python bench/stream.py [--clips 480] [--batch-size 16] [--workers 0 1 2]

Both loaders deliver the same thing to the training step, batches of ``input_features``
``[B, 80, 3000]`` and ``labels`` over the same clips, with the same worker counts:
- shards: ``pipeline.stream.make_loader`` over shards packed from the corpus;
- seed: a map-style ``Dataset`` whose ``__getitem__`` decodes the audio file, resamples it and runs
  ``WhisperFeatureExtractor`` (the seed's per-item work), in a ``DataLoader``.
Each row runs in a fresh process, so its peak resident memory (main process plus workers) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def seed_loader(corpus: Path, tokenizer, batch_size: int, workers: int):
    import numpy as np
    import torch
    from transformers import WhisperFeatureExtractor

    from bench.seed import SeedDataset, audio_files

    dataset = SeedDataset(audio_files(corpus / "train"), WhisperFeatureExtractor(feature_size=80), tokenizer)

    def collate(items):
        width = max(len(it["labels"]) for it in items)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for row, it in enumerate(items):
            labels[row, : len(it["labels"])] = torch.tensor(it["labels"])
        feats = torch.from_numpy(np.stack([it["input_features"] for it in items]))
        return {"input_features": feats, "labels": labels}

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       collate_fn=collate)


def measure(kind: str, data: Path, batch_size: int, workers: int) -> dict:
    """One row, in this process: samples/s over one pass, after the first batch (start-up) is out."""
    import torch

    from pipeline.model import load_processor

    torch.set_num_threads(1)
    tokenizer = load_processor("tiny").tokenizer
    if kind == "shards":
        from pipeline.stream import make_loader

        loader = make_loader(str(data / "shards" / "train"), tokenizer, batch_size=batch_size, train=True,
                             num_workers=workers)
    else:
        loader = seed_loader(data / "corpus", tokenizer, batch_size, workers)
    start = time.perf_counter()
    first, samples = None, 0
    for batch in loader:
        if first is None:
            first = time.perf_counter()
        else:
            samples += batch["input_features"].shape[0]
    end = time.perf_counter()
    peak_kb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
               + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"kind": kind, "workers": workers, "samples": samples, "seconds": end - first,
            "samples_per_s": samples / (end - first), "startup_s": first - start, "peak_rss_mb": peak_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", type=Path, help="work folder to reuse (corpus/ and shards/)")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: measure one row and print it as JSON
        print(json.dumps(measure(args.one[0], args.data, args.batch_size, int(args.one[1]))))
        return

    data = args.data or Path(tempfile.mkdtemp(prefix="bench_stream_"))
    if not (data / "corpus" / "train").is_dir():
        from shard_tools.synth import make_corpus

        make_corpus(data / "corpus", train=args.clips, validation=0)
    if not (data / "shards" / "train" / "index.json").exists():
        subprocess.run([sys.executable, "-m", "shard_tools.pack", str(data / "corpus"), "--out",
                        str(data / "shards")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = []
    for workers in args.workers:
        for kind in ("seed", "shards"):
            out = subprocess.run([sys.executable, __file__, "--data", str(data), "--batch-size",
                                  str(args.batch_size), "--one", kind, str(workers)], cwd=ROOT, check=True,
                                 capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{args.clips} clips, batch {args.batch_size}, {os.cpu_count()} cores\n")
    print("| loader | workers | samples/s | speed-up | start-up s | peak RSS MB |\n|---|---|---|---|---|---|")
    seed = {r["workers"]: r["samples_per_s"] for r in rows if r["kind"] == "seed"}
    for r in rows:
        print(f"| {r['kind']} | {r['workers']} | {r['samples_per_s']:.0f} | "
              f"{r['samples_per_s'] / seed[r['workers']]:.1f}x | {r['startup_s']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
