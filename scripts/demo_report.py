"""Score the demo's captions next to a trivial baseline: the most common training caption for every clip.

    python scripts/demo_report.py --train-shards DIR --predictions preds.jsonl [--out report.json] \
        [--style captions=preds.jsonl --style keywords=preds_keywords.jsonl]

The baseline is what a model that learnt nothing from the sound can reach; the demo passes only if the
trained model beats it on CIDEr-D. ``--style NAME=PREDICTIONS``, one per caption style of a mixed run
(each the held-out clips captioned with that source's prefix, scored against that style's
references): the exact match of each style, and how often its captions match another style's
references of the same clip instead; then the demo also needs every style to match its own
references more often than any other's (the prefix picks the style).
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


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def style_matches(styles: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """``{style: {other style: share of style's captions in other's references of the same clip}}``
    (the diagonal is each style's own exact match), over the clips every style captioned."""
    by_key = {name: {row["key"]: row for row in rows} for name, rows in styles.items()}
    keys = sorted(set.intersection(*(set(rows) for rows in by_key.values())))
    return {name: {other: sum(by_key[name][k]["pred_caption"].strip() in by_key[other][k]["gt_captions"]
                              for k in keys) / max(1, len(keys)) for other in styles} for name in styles}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-shards", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--style", action="append", default=[], metavar="NAME=PREDICTIONS",
                        help="a caption style's predictions (held-out clips prompted with its prefix)")
    args = parser.parse_args()
    if any("=" not in item for item in args.style):
        parser.error("--style takes NAME=PREDICTIONS, e.g. --style keywords=demo_run/preds_keywords.jsonl")

    rows = read_rows(args.predictions)
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
    styles = style_matches({name: read_rows(Path(path)) for name, path in
                            (item.split("=", 1) for item in args.style)}) if args.style else {}
    if styles:
        print("\n| prompted with | " + " | ".join(f"matches {name} references" for name in styles) + " |\n|---"
              + "|---" * len(styles) + "|")
        for name, shares in styles.items():
            print(f"| {name} prefix | " + " | ".join(f"{share:.3f}" for share in shares.values()) + " |")
        own = all(shares[name] > max((v for o, v in shares.items() if o != name), default=0.0)
                  for name, shares in styles.items())
        print(f"\neach prefix gives its own style: {'yes' if own else 'NO'}")
        beat = beat and own
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": model, "baseline": baseline, "baseline_caption": most_common,
                                   "exact_match": exact, **({"styles": styles} if styles else {})}, indent=1))
        os.replace(tmp, args.out)
    return 0 if beat else 1


if __name__ == "__main__":
    sys.exit(main())
