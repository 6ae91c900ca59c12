"""Loader throughput: padded, tokenized batches from shards against the seed's on-the-fly loader;
and (``--handover``) the main process's time per batch in the loader, this tree against another
revision's code.

    python bench/stream.py [--clips 480] [--batch-size 16] [--workers 0 1 2] [--baseline 3633175]
    python bench/stream.py --handover --batch-size 64 --workers 2 [--step-ms 200] [--device cuda]

Throughput: both loaders deliver the same thing to the training step, batches of
``input_features`` ``[B, 80, 3000]`` and ``labels`` over the same clips, with the same worker counts:
- shards: ``pipeline.stream.make_loader`` over shards packed from the corpus, whose compact batches
  are padded with ``expand_features`` in the loop (the step's work on a CPU); ``--baseline REV``
  adds the rows of REV's own ``bench/stream.py`` (its loader padded in the main process);
- seed: a map-style ``Dataset`` whose ``__getitem__`` decodes the audio file, resamples it and runs
  ``WhisperFeatureExtractor`` (the seed's per-item work), in a ``DataLoader``.
Each row runs in a fresh process, so its peak resident memory (main process plus workers) is its own.

Handover: the infinite training loader with persistent workers, after one batch and one step of
start-up, then ``--batches`` steps of ``--step-ms`` each (``time.sleep``: it leaves the CPU to the
workers, as a GPU step does), so the workers are ahead. Per batch: the time inside ``next`` (the
loader's share of the main process) and the time to make the step's float32 ``[B, 80, 3000]``
features from what it got (REV: the cast and copy ``forward_logits`` did; this tree:
``expand_features`` on ``--device``; on a GPU both are only queued, and the step waits for the
device before sleeping). Rows alternate between REV (``--baseline``, e.g. 3633175, the code before
issue 11) and this tree, ``--repeats`` times; medians over the batches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
        from pipeline.collate import expand_features
        from pipeline.stream import make_loader

        loader = make_loader(str(data / "shards" / "train"), tokenizer, batch_size=batch_size, train=True,
                             num_workers=workers)
    else:
        loader = seed_loader(data / "corpus", tokenizer, batch_size, workers)
    start = time.perf_counter()
    first, samples = None, 0
    for batch in loader:
        features = expand_features(batch) if kind == "shards" else batch["input_features"]  # [B, 80, 3000]
        if first is None:
            first = time.perf_counter()
        else:
            samples += features.shape[0]
    end = time.perf_counter()
    peak_kb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
               + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"kind": kind, "workers": workers, "samples": samples, "seconds": end - first,
            "samples_per_s": samples / (end - first), "startup_s": first - start, "peak_rss_mb": peak_kb / 1024}


def handover(kind: str, data: Path, args) -> dict:
    """One handover row in this process (module doc); ``kind`` "before" runs REV's loader (its code
    first on ``sys.path``), "after" this tree's."""
    import statistics

    import torch

    from pipeline.model import load_processor
    from pipeline.stream import make_loader

    torch.set_num_threads(1)
    device, step = torch.device(args.device), args.step_ms / 1000
    options = dict(batch_size=args.batch_size, train=True, infinite=True, num_workers=args.workers[0],
                   persistent_workers=args.workers[0] > 0, pin_memory=device.type == "cuda")
    if kind == "after":
        from pipeline.collate import expand_features

        options["device"] = device
    batches = iter(make_loader(str(data / "shards" / "train"), load_processor("tiny").tokenizer, **options))
    next(batches)
    time.sleep(step)
    in_loader, to_features = [], []
    for _ in range(args.batches):
        start = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        if kind == "after":
            features = expand_features(batch, device=device, dtype=torch.float32)  # [B, 80, 3000]
        else:
            features = batch["input_features"].to(device, torch.float32, non_blocking=True)  # [B, 80, 3000]
        made = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        in_loader.append(got - start)
        to_features.append(made - got)
        del features
        time.sleep(step)
    return {"kind": kind, "loader_ms": 1000 * statistics.median(in_loader),
            "features_ms": 1000 * statistics.median(to_features), "batch": args.batch_size,
            "workers": args.workers[0], "device": str(device)}


def run_handover(args, data: Path, baseline: Path | None) -> None:
    rows, codes = [], ([("before", baseline)] if baseline else []) + [("after", ROOT)]
    for _ in range(args.repeats):
        for kind, code in codes:
            out = subprocess.run([sys.executable, __file__, "--handover-one", kind, "--code-root", str(code),
                                  "--data", str(data), "--batch-size", str(args.batch_size), "--workers",
                                  str(args.workers[0]), "--step-ms", str(args.step_ms), "--batches",
                                  str(args.batches), "--device", args.device], cwd=ROOT, check=True,
                                 capture_output=True, text=True, env=child_env())
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nbatch {args.batch_size}, {args.workers[0]} workers, {args.step_ms:g}-ms simulated step, "
          f"{args.batches} batches per row, device {args.device}, {os.cpu_count()} cores; "
          f"before = {args.baseline or '-'}, after = this tree\n")
    print("| code | loader ms/batch (main process) | step's features ms/batch | sum |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['loader_ms']:.2f} | {r['features_ms']:.2f} | "
              f"{r['loader_ms'] + r['features_ms']:.2f} |")
    median = {k: statistics.median(r["loader_ms"] for r in rows if r["kind"] == k) for k, _ in codes}
    print("\nloader time, median of rows: " + ", ".join(f"{k} {v:.2f} ms" for k, v in median.items())
          + (f": {median['before'] / median['after']:.1f}x less" if baseline else ""))


def child_env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def prepare(data: Path, clips: int) -> None:
    if not (data / "corpus" / "train").is_dir():
        from shard_tools.synth import make_corpus

        make_corpus(data / "corpus", train=clips, validation=0)
    if not (data / "shards" / "train" / "index.json").exists():
        subprocess.run([sys.executable, "-m", "shard_tools.pack", str(data / "corpus"), "--out",
                        str(data / "shards")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", type=Path, help="work folder to reuse (corpus/ and shards/)")
    parser.add_argument("--baseline", help="git revision whose code gives the baseline rows")
    parser.add_argument("--handover", action="store_true", help="main-process time per batch in the loader")
    parser.add_argument("--step-ms", type=float, default=200.0, help="handover: simulated step")
    parser.add_argument("--batches", type=int, default=20, help="handover: timed batches per row")
    parser.add_argument("--repeats", type=int, default=3, help="handover: rows per code, alternating")
    parser.add_argument("--device", default="cpu", help="handover: where the step's features are made")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--handover-one", help=argparse.SUPPRESS)
    parser.add_argument("--code-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: measure one row and print it as JSON
        print(json.dumps(measure(args.one[0], args.data, args.batch_size, int(args.one[1]))))
        return
    if args.handover_one:
        sys.path.insert(0, str(args.code_root))  # before any pipeline import: REV's code or this tree's
        print(json.dumps(handover(args.handover_one, args.data, args)))
        return

    from bench.baseline import checkout

    data = args.data or Path(tempfile.mkdtemp(prefix="bench_stream_"))
    if args.handover:
        prepare(data, max(args.clips, args.batch_size * (args.batches + 2)))  # one epoch: workers stay ahead
        run_handover(args, data, checkout(args.baseline) if args.baseline else None)
        return
    prepare(data, args.clips)
    baseline = checkout(args.baseline) if args.baseline else None
    rows = []
    for workers in args.workers:
        for kind, script in [("seed", __file__)] + (  # REV's row, then this tree's
                [(f"shards ({args.baseline})", baseline / "bench" / "stream.py")] if baseline else []) + [
                ("shards", __file__)]:
            out = subprocess.run([sys.executable, str(script), "--data", str(data), "--batch-size",
                                  str(args.batch_size), "--one", kind.split()[0], str(workers)],
                                 cwd=Path(script).resolve().parent.parent, check=True, capture_output=True,
                                 text=True, env=child_env())
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "kind": kind})
    print(f"\n{args.clips} clips, batch {args.batch_size}, {os.cpu_count()} cores\n")
    print("| loader | workers | samples/s | speed-up | start-up s | peak RSS MB |\n|---|---|---|---|---|---|")
    seed = {r["workers"]: r["samples_per_s"] for r in rows if r["kind"] == "seed"}
    for r in rows:
        print(f"| {r['kind']} | {r['workers']} | {r['samples_per_s']:.0f} | "
              f"{r['samples_per_s'] / seed[r['workers']]:.1f}x | {r['startup_s']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
