"""Loader throughput: samples/s of ``make_loader`` over synthetic shards (not a test).

    python tests/_stream_bench.py [--samples 2000] [--frames 500] [--batch-size 16] [--workers 0 2]

Writes shards of float16 ``[80, frames]`` mels (the documented format, via tests/conftest.py's
``mel_sample_bytes``) to a temporary folder, then times one training epoch per worker count: first
batch latency (worker start-up included) and steady samples/s over the whole epoch.
"""

import argparse
import hashlib
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import load_processor  # noqa: E402
from pipeline.stream import make_loader  # noqa: E402
from tests.conftest import mel_sample_bytes  # noqa: E402


def write_shards(folder: Path, samples: int, frames: int, per_shard: int = 250) -> None:
    entries = []
    for s in range(-(-samples // per_shard)):
        path = folder / f"{s:03d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                key = f"clip{i:06d}"
                for name, data in mel_sample_bytes(key, frames, [f"a sound number {i}"], seed=i).items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        count = min(samples, (s + 1) * per_shard) - s * per_shard
        entries.append({"name": path.name, "samples": count, "seconds": count * frames / 100,
                        "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    (folder / "index.json").write_text(json.dumps({"format": "whisper-caption-stream", "version": 1,
                                                   "features": {"n_mels": 80}, "shards": entries}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    tokenizer = load_processor("tiny").tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), args.samples, args.frames)
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
