"""Inference throughput: infer_stream.py against the seed's test.py approach, same clips and model, one run.

    python bench/infer.py [--clips 200] [--batch-size 16] [--workers 2] [--max-new-tokens 30] [--rounds 3]
                          [--data DIR]

Rows, each in a fresh process, all over the same generated corpus (wav/flac/ogg/mp3, 16-48 kHz, mono
and stereo), the same model (built-in ``tiny``), greedy decoding with the same ``max_new_tokens``,
batch size and DataLoader workers:
- seed: a map-style ``Dataset`` whose ``__getitem__`` runs ``librosa.load`` + ``WhisperFeatureExtractor``
  (``bench.seed.seed_features``, the seed's per-item work) in a ``DataLoader``, then ``model.generate``;
- ``infer_stream.py --shards``: the same clips packed by ``shard_tools.pack`` (packing not timed);
- ``infer_stream.py --audio``: the raw files, decoded and featurised in workers by ``pipeline.features``.
clips/s counts from the first batch requested to the last caption (model loading excluded), as the
final line of infer_stream.py does. The random tiny model never ends a caption by itself, so every
clip gets exactly ``max_new_tokens`` tokens: a fixed decoding cost per clip, the same in every row.
The rows run interleaved for ``--rounds`` rounds; the table gives the best and the median, since on a
shared machine one row can land in a busy spell (we saw the same command take 10 s and 34 s).
Every row runs with ``--threads`` torch threads (default 1): on 2 cores shared with other work, two
spinning OpenMP threads made the same 20-clip run 3-10x slower and its time erratic (2.0 s vs 16.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = ("seed: DataLoader(librosa.load + WhisperFeatureExtractor) + generate",
        "infer_stream.py --shards (packed log-mel)", "infer_stream.py --audio (raw files)")
FINAL_LINE = re.compile(r"^(\d+) clips in ([\d.]+) s \(([\d.]+) clips/s\)$", re.M)


def seed_row(data: Path, batch_size: int, workers: int, max_new_tokens: int) -> dict:
    """The seed's loop, in this process: per-item features in a DataLoader, then generate."""
    import torch
    from transformers import WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    from bench.seed import SeedDataset, audio_files
    from pipeline.model import LANGUAGE, TASK, load_model, load_processor

    hf_logging.set_verbosity_error()
    dataset = SeedDataset(audio_files(data / "corpus" / "train"), WhisperFeatureExtractor(feature_size=80))

    processor = load_processor("tiny")
    model = load_model("tiny", processor).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    clips = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            tokens = model.generate(input_features=batch["input_features"], language=LANGUAGE, task=TASK, do_sample=False,
                                    max_new_tokens=max_new_tokens)
            processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)  # decoded as the seed did
            clips += len(batch["path"])
    return {"clips": clips, "seconds": time.perf_counter() - start}


def infer_stream_row(source: list[str], out: Path, env: dict, batch_size: int, workers: int,
                     max_new_tokens: int) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "infer_stream.py"), "--model_name", "tiny", *source,
                           "--batch_size", str(batch_size), "--num_dataloader_workers", str(workers),
                           "--max_new_tokens", str(max_new_tokens), "--output", str(out), "--metrics", "bleu"],
                          cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    clips, seconds, _ = FINAL_LINE.findall(proc.stdout)[-1]
    return {"clips": int(clips), "seconds": float(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every row (OMP_NUM_THREADS)")
    parser.add_argument("--data", type=Path, help="work folder to reuse (corpus/ and shards/)")
    parser.add_argument("--seed-row", action="store_true", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.seed_row:
        print(json.dumps(seed_row(args.data, args.batch_size, args.workers, args.max_new_tokens)))
        return

    data = args.data or Path(tempfile.mkdtemp(prefix="bench_infer_"))
    if not (data / "corpus" / "train").is_dir():
        from shard_tools.synth import make_corpus

        make_corpus(data / "corpus", train=args.clips, validation=0, min_seconds=args.min_seconds,
                    max_seconds=args.max_seconds)
    if not (data / "shards" / "train" / "index.json").exists():
        subprocess.run([sys.executable, "-m", "shard_tools.pack", str(data / "corpus"), "--out", str(data / "shards")],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = {name: [] for name in ROWS}
    for _ in range(args.rounds):  # rows interleaved, so a busy spell on the machine hits all of them
        for name, seconds in one_round(data, args).items():
            rows[name].append(seconds)

    print(f"\n{args.clips} clips, model tiny, greedy, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
          f"{args.workers} DataLoader workers, {os.cpu_count()} cores, torch threads {args.threads}, "
          f"best and median of {args.rounds} interleaved rounds; load average before: {load}\n")
    print("| path | best s | clips/s (best) | clips/s (median) | vs seed (best) |\n|---|---|---|---|---|")
    seed_best = min(rows[ROWS[0]])
    for name, times in rows.items():
        best, median = min(times), statistics.median(times)
        print(f"| {name} | {best:.1f} | {args.clips / best:.1f} | {args.clips / median:.1f} "
              f"| {seed_best / best:.2f}x |")
    print(f"(work folder: {data})")


def one_round(data: Path, args) -> dict:
    """Seconds per row, each row in a fresh process."""
    common = (args.batch_size, args.workers, args.max_new_tokens)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    seed = subprocess.run([sys.executable, __file__, "--seed-row", "--data", str(data), "--batch-size",
                           str(args.batch_size), "--workers", str(args.workers), "--max-new-tokens",
                           str(args.max_new_tokens)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    results = [json.loads(seed.stdout.strip().splitlines()[-1]),
               infer_stream_row(["--shards", str(data / "shards" / "train")], data / "shards.jsonl", env, *common),
               infer_stream_row(["--audio", str(data / "corpus" / "train")], data / "audio.jsonl", env, *common)]
    for result in results:
        if result["clips"] != args.clips:
            raise RuntimeError(f"a row captioned {result['clips']} clips, not {args.clips}: {result}")
    return {name: result["seconds"] for name, result in zip(ROWS, results)}


if __name__ == "__main__":
    main()
