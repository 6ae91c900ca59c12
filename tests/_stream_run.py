"""Run a loader in a fresh process for tests/test_stream.py: take N batches, optionally starting from
a saved state, and print one JSON object: per-batch fingerprints, the final state and how many
samples this process decoded (counted in-process, so meaningful with --workers 0)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.stream as stream  # noqa: E402
from pipeline.model import load_processor  # noqa: E402


def fingerprint(batch: dict) -> dict:
    return {"keys": batch["keys"], "is_pad": batch["is_pad"].tolist(),
            "labels": batch["labels"].tolist(), "features": float(batch["input_features"].double().sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shuffle-buffer", type=int, default=7)
    parser.add_argument("--take", type=int, required=True)
    parser.add_argument("--state-in")
    parser.add_argument("--state-out")
    parser.add_argument("--persistent", action="store_true")
    args = parser.parse_args()

    decoded = [0]
    original = stream.decode_sample

    def counting_decode(raw, n_mels=None):
        decoded[0] += 1
        return original(raw, n_mels)

    stream.decode_sample = counting_decode
    loader = stream.make_loader(args.urls, load_processor("tiny").tokenizer, batch_size=args.batch_size,
                                num_workers=args.workers, shuffle_buffer=args.shuffle_buffer, seed=3, infinite=True,
                                persistent_workers=args.persistent)
    if args.state_in:
        loader.load_state_dict(json.loads(Path(args.state_in).read_text()))
    batches = []
    for batch in loader:
        batches.append(fingerprint(batch) | {"epoch": loader.epoch})
        if len(batches) == args.take:
            break
    state = loader.state_dict()
    if args.state_out:
        Path(args.state_out).write_text(json.dumps(state))
    print(json.dumps({"batches": batches, "state": state, "decoded": decoded[0], "len": len(loader)}))


if __name__ == "__main__":
    main()
