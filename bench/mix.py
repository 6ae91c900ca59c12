"""Mixing sources: loader throughput of one shard set read as one source and as three weighted
sources, beside another revision's single-source loader; and the main-process cost of the per-source
progress (``StreamLoader.progress``, logged every ``logging_steps``) at large epoch sizes.

    python bench/mix.py [--samples 3000] [--frames 300] [--workers 2] [--repeats 3] [--baseline 459be6b]

Throughput: synthetic shards (``shard_tools.synth.write_uniform_shards``), one training epoch per row in a fresh
process, rows alternating (REV's single source if ``--baseline``, this tree's single source, this
tree's three sources of a third of the shards each at weights 1:2:3); wall-clock samples/s, and
CPU time per sample (main process and workers), steadier on a shared machine. Progress: no data is read;
a mix of three sources of ``N`` samples, its position half-way through an epoch of a layout of
8 ranks x 4 workers, batch 16; median of 20 calls.
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
KINDS = ("one source", "three sources")


def measure(kind: str, data: Path, workers: int, batch_size: int) -> dict:
    """One epoch of ``kind`` over the shards in ``data``: samples/s and the first batch's latency."""
    from pipeline.model import load_processor
    from pipeline.stream import make_loader

    if kind == "three sources":
        from pipeline.data_settings import Source

        shards = sorted(str(p) for p in data.glob("*.tar"))
        third = -(-len(shards) // 3)
        urls = [Source(f"s{i}", shards[i * third:(i + 1) * third], weight=i + 1) for i in range(3)]
    else:
        urls = str(data)
    loader = make_loader(urls, load_processor("tiny").tokenizer, batch_size=batch_size, num_workers=workers)
    start, cpu, count, first = time.perf_counter(), cpu_s(), 0, None
    for batch in loader:
        count += len(batch["keys"])
        first = first or time.perf_counter() - start
    del batch, loader  # the workers are joined, so their CPU time is counted
    return {"samples_per_s": count / (time.perf_counter() - start), "first_s": first, "samples": count,
            "cpu_ms_per_sample": (cpu_s() - cpu) * 1000 / count}


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (the loader's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def progress_ms(samples: int) -> float:
    """Median ms of ``StreamLoader.progress`` for a three-source mix of ``samples`` (no data read)."""
    from pipeline.data_settings import DataSettings
    from pipeline.plan import Mix
    from pipeline.stream import ShardStream, StreamLoader
    from shard_tools.urls import Shard

    per_shard, settings = 1000, DataSettings(batch_size=16, num_workers=4)
    counts = [[per_shard] * (samples * share // 6 // per_shard) for share in (1, 2, 3)]
    shards = [Shard(f"/nowhere/{s}-{i}.tar", c) for s, cs in enumerate(counts) for i, c in enumerate(cs)]
    mix = Mix.weighted(["a", "b", "c"], counts, [1, 2, 3])
    loader = StreamLoader(ShardStream(shards, None, settings, rank=0, world_size=8, mix=mix), settings)
    loader.epoch, loader.batches = 3, len(loader) // 2
    times = []
    for _ in range(20):
        start = time.perf_counter()
        loader.progress()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="git revision whose single-source loader gives baseline rows")
    parser.add_argument("--progress-samples", type=int, nargs="+", default=[100_000, 500_000, 2_000_000])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--code-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: one row, as JSON
        sys.path.insert(0, str(args.code_root))  # before any pipeline import: REV's code or this tree's
        print(json.dumps(measure(args.one, args.data, args.workers, args.batch_size)))
        return

    sys.path.insert(0, str(ROOT))
    from bench.baseline import checkout
    from shard_tools.synth import write_uniform_shards

    data = Path(tempfile.mkdtemp(prefix="bench_mix_"))
    write_uniform_shards(data, args.samples, args.frames)
    codes = ([(f"one source ({args.baseline})", "one source", checkout(args.baseline))] if args.baseline else []) + [
        (kind, kind, ROOT) for kind in KINDS]
    rows = []
    for _ in range(args.repeats):
        for label, kind, code in codes:
            out = subprocess.run([sys.executable, __file__, "--one", kind, "--code-root", str(code), "--data",
                                  str(data), "--workers", str(args.workers), "--batch-size", str(args.batch_size)],
                                 cwd=ROOT, check=True, capture_output=True, text=True,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "kind": label})
    print(f"\n{args.samples} samples of {args.frames} frames, batch {args.batch_size}, {args.workers} workers, "
          f"{os.cpu_count()} cores; rows alternate\n")
    print("| loader | samples/s (median) | rows | first batch s (median) | CPU ms per sample (median) |\n"
          "|---|---|---|---|---|")
    for label, _, _ in codes:
        speeds = [r["samples_per_s"] for r in rows if r["kind"] == label]
        firsts = [r["first_s"] for r in rows if r["kind"] == label]
        cpu = [r["cpu_ms_per_sample"] for r in rows if r["kind"] == label]
        print(f"| {label} | {statistics.median(speeds):.0f} | {', '.join(f'{v:.0f}' for v in speeds)} | "
              f"{statistics.median(firsts):.2f} | {statistics.median(cpu):.2f} |")
    print("\n| epoch samples | progress() ms (median of 20) |\n|---|---|")
    for samples in args.progress_samples:
        print(f"| {samples} | {progress_ms(samples):.1f} |")


if __name__ == "__main__":
    main()
