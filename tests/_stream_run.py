"""Run a loader in a fresh process for tests/test_stream.py: take N batches, optionally starting from
a saved state, and print one JSON object: per-batch fingerprints, the final state, how many
samples this process decoded (counted in-process, so meaningful with --workers 0), how much its
resident memory grew after the first batch, and how many yielded batches are still alive at the end."""

import argparse
import gc
import json
import os
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.stream as stream  # noqa: E402
from pipeline.model import load_processor  # noqa: E402


def fingerprint(batch: dict) -> dict:
    return {"keys": batch["keys"], "is_pad": batch["is_pad"].tolist(),
            "labels": batch["labels"].tolist(), "features": float(batch["input_features"].double().sum())}


def rss_bytes() -> int:
    """Resident memory of this process now (torch's allocations included, unlike tracemalloc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shuffle-buffer", type=int, default=7)
    parser.add_argument("--bucket", type=int, default=0, help="bucket_pool_batches")
    parser.add_argument("--take", type=int, required=True)
    parser.add_argument("--state-in")
    parser.add_argument("--state-out")
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--sources", help="JSON list of Source fields: a mix (urls is then ignored)")
    args = parser.parse_args()

    decoded = [0]
    original = stream.decode_sample

    def counting_decode(raw, n_mels=None):
        decoded[0] += 1
        return original(raw, n_mels)

    stream.decode_sample = counting_decode
    urls = [stream.Source(**source) for source in json.loads(args.sources)] if args.sources else args.urls
    loader = stream.make_loader(urls, load_processor("tiny").tokenizer, batch_size=args.batch_size,
                                num_workers=args.workers, shuffle_buffer=args.shuffle_buffer, seed=3, infinite=True,
                                persistent_workers=args.persistent, bucket_pool_batches=args.bucket)
    if args.state_in:
        loader.load_state_dict(json.loads(Path(args.state_in).read_text()))
    batches, alive, rss = [], [], []
    for batch in loader:
        batches.append(fingerprint(batch) | {"epoch": loader.epoch})
        alive.append(weakref.ref(batch["input_features"]))
        rss.append(rss_bytes())
        if len(batches) == args.take:
            break
    del batch
    gc.collect()
    state = loader.state_dict()
    if args.state_out:
        Path(args.state_out).write_text(json.dumps(state))
    print(json.dumps({"batches": batches, "state": state, "decoded": decoded[0], "len": len(loader),
                      "rss_growth": max(rss) - rss[0], "alive": sum(ref() is not None for ref in alive)}))


if __name__ == "__main__":
    main()
