"""Score the demo's captions next to a trivial baseline: the most common training caption for every clip.

    python scripts/demo_report.py --train-shards DIR --predictions preds.jsonl [--out report.json] \
        [--style captions=preds.jsonl,data/train --style keywords=preds_keywords.jsonl,data_keywords/train]

The baseline is what a model that learnt nothing from the sound can reach; the demo passes only if the
trained model beats it on CIDEr-D. ``--style NAME=PREDICTIONS[,TRAIN_SHARDS]``, one per caption style
of a mixed run, each the held-out clips captioned with that source's prefix and its references in
that style: two tables, rows the prefix, columns the style. Exact match: the share of captions that
are one of that style's references of the same clip (content and style right). Style match: the
share that are a caption of that style at all, for any clip (its references here and in its
TRAIN_SHARDS): the style is right even where the content is not learnt yet. The demo then also
needs every prefix to give its own style more often than any other.
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


def style_matches(styles: dict[str, list[dict]], vocabulary: dict[str, set[str]]) -> dict[str, dict]:
    """``{prefix style: {"exact_match": {style: share}, "style_match": {style: share}}}`` over the
    clips every style captioned: a caption among ``style``'s references of the same clip, and among
    ``vocabulary[style]`` (that style's captions of any clip)."""
    by_key = {name: {row["key"]: row for row in rows} for name, rows in styles.items()}
    keys = sorted(set.intersection(*(set(rows) for rows in by_key.values())))

    def share(name: str, matches) -> float:
        return sum(matches(by_key[name][k]["pred_caption"].strip(), k) for k in keys) / max(1, len(keys))

    return {name: {"exact_match": {other: share(name, lambda pred, k: pred in by_key[other][k]["gt_captions"])
                                   for other in styles},
                   "style_match": {other: share(name, lambda pred, k: pred in vocabulary[other]) for other in styles}}
            for name in styles}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-shards", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--style", action="append", default=[], metavar="NAME=PREDICTIONS[,TRAIN_SHARDS]",
                        help="a caption style's predictions (held-out clips prompted with its prefix) and the "
                             "training shards of that style")
    args = parser.parse_args()
    if any("=" not in item for item in args.style):
        parser.error("--style takes NAME=PREDICTIONS[,TRAIN_SHARDS], e.g. "
                     "--style keywords=demo_run/preds_keywords.jsonl,demo_run/data_keywords/train")

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
    styles = {}
    if args.style:
        given = {name: value.split(",", 1) for name, value in (item.split("=", 1) for item in args.style)}
        rows_of = {name: read_rows(Path(parts[0])) for name, parts in given.items()}
        vocabulary = {name: {c for row in rows_of[name] for c in row["gt_captions"]}
                      | (set(training_captions(Path(parts[1]))) if len(parts) > 1 else set())
                      for name, parts in given.items()}
        styles = style_matches(rows_of, vocabulary)
    for table in ("exact_match", "style_match") if styles else ():
        print(f"\n| {table.replace('_', ' ')}: prompted with | " + " | ".join(f"{name} style" for name in styles)
              + " |\n|---" + "|---" * len(styles) + "|")
        for name, result in styles.items():
            print(f"| {name} prefix | " + " | ".join(f"{v:.3f}" for v in result[table].values()) + " |")
    if styles:
        own = all(result["style_match"][name] > max((v for o, v in result["style_match"].items() if o != name),
                                                    default=0.0)
                  for name, result in styles.items())
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
