"""Score the demo's captions next to a trivial baseline: the most common training caption for every clip.

    python scripts/demo_report.py --train-shards DIR --predictions preds.jsonl [--out report.json]

The baseline is what a model that learnt nothing from the sound can reach; the demo passes only if the
trained model beats it on CIDEr-D.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.metrics import score  # noqa: E402


def training_captions(shard_dir: Path):
    """Every caption of every training clip, read from the shards' JSON members (no pickle)."""
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    yield from json.loads(tar.extractfile(member).read())["captions"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-shards", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    rows = [json.loads(line) for line in args.predictions.read_text().splitlines() if line.strip()]
    references = [row["gt_captions"] for row in rows]
    most_common, count = collections.Counter(training_captions(args.train_shards)).most_common(1)[0]
    model = score([row["pred_caption"] for row in rows], references)["metrics"]
    baseline = score([most_common] * len(rows), references)["metrics"]
    exact = sum(row["pred_caption"].strip() in row["gt_captions"] for row in rows) / len(rows)
    exact_baseline = sum(most_common in refs for refs in references) / len(rows)

    print(f"\n{len(rows)} held-out clips; baseline caption: {most_common!r} (said {count} times in training)\n")
    print("| metric | trained tiny model | most-common-caption baseline |\n|---|---|---|")
    for name, entry in model.items():
        if entry["available"]:
            print(f"| {name} | {entry['value']:.3f} | {baseline[name]['value']:.3f} |")
        else:
            print(f"| {name} | unavailable: {entry['reason'][:90]} | |")
    print(f"| exact match | {exact:.3f} | {exact_baseline:.3f} |")
    ours, theirs = model["CIDEr_D"]["value"], baseline["CIDEr_D"]["value"]
    beat = ours > theirs
    print(f"\nCIDEr-D: model {ours:.3f} vs baseline {theirs:.3f} "
          f"({'the model beats the baseline by ' + format(ours - theirs, '.3f') if beat else 'NOT beaten'})")
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": model, "baseline": baseline, "baseline_caption": most_common,
                                   "exact_match": exact}, indent=1))
        os.replace(tmp, args.out)
    return 0 if beat else 1


if __name__ == "__main__":
    sys.exit(main())
