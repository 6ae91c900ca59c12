"""Loader throughput: samples/s of ``make_loader`` over synthetic shards (not a test).

    python tests/_stream_bench.py [--samples 2000] [--frames 500] [--batch-size 16] [--workers 0 2]

Writes shards of float16 ``[80, frames]`` mels (the documented format, via
``shard_tools.synth.write_uniform_shards``) to a temporary folder, then times one training epoch per
worker count: first batch latency (worker start-up included) and steady samples/s over the whole epoch.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import load_processor  # noqa: E402
from pipeline.stream import make_loader  # noqa: E402
from shard_tools.synth import write_uniform_shards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    tokenizer = load_processor("tiny").tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        write_uniform_shards(Path(tmp), args.samples, args.frames)
        for workers in args.workers:
            loader = make_loader(tmp, tokenizer, batch_size=args.batch_size, num_workers=workers)
            start = time.perf_counter()
            count, first = 0, None
            for batch in loader:
                count += len(batch["keys"])
                first = first or time.perf_counter() - start
            elapsed = time.perf_counter() - start
            print(f"workers={workers} batch={args.batch_size} samples={count} frames={args.frames}: "
                  f"{count / elapsed:.0f} samples/s (first batch after {first:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
