"""Inference throughput: infer_stream.py against the seed's test.py approach, and the static decoder
against HF ``generate`` on the same batches, same clips and model, one run.

    python bench/infer.py [--clips 200] [--batch-size 16] [--workers 2] [--max-new-tokens 30] [--rounds 3]
                          [--data DIR]
    python bench/infer.py --device cuda --model-dims whisper-small --batch-size 64 [--decode-batches 8]
    python bench/infer.py --min-seconds 10 --max-seconds 10 --audio-window full fit [--only-windows] [--baseline REV]

End-to-end rows, each in a fresh process, all over the same generated corpus (wav/flac/ogg/mp3,
16-48 kHz, mono and stereo), the same model, greedy decoding with the same ``max_new_tokens``,
batch size and DataLoader workers:
- seed: a map-style ``Dataset`` whose ``__getitem__`` runs ``librosa.load`` + ``WhisperFeatureExtractor``
  (``bench.seed.seed_features``, the seed's per-item work) in a ``DataLoader``, then ``model.generate``;
- ``infer_stream.py --shards --decoder hf``: the same clips packed by ``shard_tools.pack`` (packing not
  timed), captioned by HF ``generate`` as infer_stream.py did before issue 12;
- ``infer_stream.py --shards``: the same, with the static decoder (the default);
- ``infer_stream.py --audio``: the raw files, decoded and featurised in workers by ``shard_tools.features``.
clips/s counts from the first batch requested to the last caption (model loading excluded), as the
final line of infer_stream.py does. The two ``--shards`` rows' predictions are compared: "outputs
identical" under the table.
Decoding rows (one fresh process per round): ``--decode-batches`` batches of random log-mel features
``[batch, 80, 3000]`` on ``--device``, the same tensors for each row, one untimed batch first:
the encoder alone (the floor), ``generate_captions(method="static")`` and ``(method="hf")``, and the
row a user would pick instead of our decoder: HF ``generate`` with transformers' own static cache
(``cache_implementation="static"``), which on a GPU also compiles its decoding step with
``torch.compile`` (its default ``CompileConfig``: inductor, "reduce-overhead"; the untimed batch
holds the compile, and the graphs dynamo made are counted). On a CPU transformers compiles nothing
(its rule: accelerators only), so that row is the static cache alone: forcing the compile there
cost 70 s of warm-up for the tiny model on 2 cores and gave no gain. Token ids compared with HF's. On CUDA the model runs in bfloat16 (as infer_stream.py does) unless ``--fp32``.
Every caption is exactly ``max_new_tokens`` long in every row: the end token is added to the model's
``suppress_tokens`` (random models rarely end a caption, but may), so decoding costs the same per clip
(timestamp tokens are suppressed for every captioning model: ``caption_generation_config``).
Encoder windows: each ``--audio-window`` value adds the row ``infer_stream.py --shards --audio-window
W`` (static decoder); ``fit:STEP`` runs ``--audio-window fit`` on a copy of the model that records
``audio_window_step`` STEP (inference takes the step recorded with the model). The "vs full window"
column divides by the ``full`` row (else the plain ``--shards`` row), and each window row's captions
are compared with the plain ``--shards`` row's (the model records ``full``): the share of equal
captions, 1.0000 where nothing changed. ``--baseline REV`` adds REV's own ``infer_stream.py
--shards`` (e.g. the code before encoder windows), its captions compared the same way.
``--only-windows`` leaves out the seed, ``--decoder hf``, ``--audio`` and decoding rows.
Models: ``tiny`` is the built-in model; ``--model-dims whisper-base``/``whisper-small`` save random
weights with openai/whisper-base's or whisper-small's dimensions (``bench.train_step.MODEL_DIMS``) as a
checkpoint in the work folder.
The rows run interleaved for ``--rounds`` rounds; the table gives the best and the median, since on a
shared machine one row can land in a busy spell (we saw the same command take 10 s and 34 s).
Every row runs with ``--threads`` torch threads (default 1): on 2 cores shared with other work, two
spinning OpenMP threads made the same 20-clip run 3-10x slower and its time erratic (2.0 s vs 16.5 s).
"""

from __future__ import annotations

import argparse
import copy
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

from bench.train_step import FULL, MODEL_DIMS, check_window  # noqa: E402  (after the path: run as a script)

ROWS = ("seed: DataLoader(librosa.load + WhisperFeatureExtractor) + generate",
        "infer_stream.py --shards --decoder hf (packed log-mel, HF generate)",
        "infer_stream.py --shards (packed log-mel, static decoder)", "infer_stream.py --audio (raw files)")
DECODE_ROWS = ("encoder only", "generate_captions static", "generate_captions hf",
               "HF generate, static cache (+ its torch.compile on a GPU)")
FINAL_LINE = re.compile(r"^(\d+) clips in ([\d.]+) s \(([\d.]+) clips/s\)$", re.M)


def seed_row(data: Path, model_name: str, device: str, batch_size: int, workers: int, max_new_tokens: int) -> dict:
    """The seed's loop, in this process: per-item features in a DataLoader, then generate (float32)."""
    import torch
    from transformers import WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    from bench.seed import SeedDataset, audio_files
    from pipeline.model import LANGUAGE, TASK, load_model, load_processor

    hf_logging.set_verbosity_error()
    dataset = SeedDataset(audio_files(data / "corpus" / "train"), WhisperFeatureExtractor(feature_size=80))

    processor = load_processor(model_name)
    model = load_model(model_name, processor).to(device).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    clips = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            tokens = model.generate(input_features=batch["input_features"].to(device), language=LANGUAGE, task=TASK,
                                    do_sample=False, max_new_tokens=max_new_tokens)
            processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)  # decoded as the seed did
            clips += len(batch["path"])
    if device == "cuda":
        torch.cuda.synchronize()
    return {"clips": clips, "seconds": time.perf_counter() - start}


def decode_rows(model_name: str, device: str, fp32: bool, batch_size: int, batches: int, max_new_tokens: int) -> dict:
    """Seconds of each ``DECODE_ROWS`` row over the same ``batches`` feature batches, and whether the
    static decoder's token ids equal HF's."""
    import torch
    from torch._dynamo.utils import counters

    from pipeline.model import generate_captions, load_model, load_processor

    dtype = torch.bfloat16 if device == "cuda" and not fp32 else torch.float32
    model = load_model(model_name, load_processor(model_name)).to(device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(batch_size, 80, 3000, generator=generator).to(device, dtype) for _ in range(batches + 1)]
    static_cache = copy.deepcopy(model)  # the same weights; generate reads the cache kind from its config
    static_cache.generation_config.cache_implementation = "static"
    calls = {DECODE_ROWS[0]: lambda f: model.model.encoder(f).last_hidden_state,
             DECODE_ROWS[1]: lambda f: generate_captions(model, f, max_new_tokens=max_new_tokens),
             DECODE_ROWS[2]: lambda f: generate_captions(model, f, max_new_tokens=max_new_tokens, method="hf"),
             DECODE_ROWS[3]: lambda f: generate_captions(static_cache, f, max_new_tokens=max_new_tokens, method="hf")}
    seconds, outputs = {}, {}
    with torch.inference_mode():
        for name, call in calls.items():
            call(features[0])  # warm-up: lazy initialisation, kernel choices
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[name] = [call(f) for f in features[1:]]
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - start
            print(f"{name}: {seconds[name]:.2f} s", file=sys.stderr, flush=True)  # kept if a later row runs out of time
    static, hf, cached = (outputs[name] for name in DECODE_ROWS[1:])
    assert all(t.shape == (batch_size, max_new_tokens) for t in static), "captions not of the forced length"

    def same(rows) -> float:
        return sum(int((a == b).sum()) for a, b in zip(rows, hf)) / (batch_size * batches * max_new_tokens)

    return {"seconds": seconds, "clips": batch_size * batches,
            "identical": all(torch.equal(a, b) for a, b in zip(static, hf)), "same_tokens": same(static),
            "static_cache_same_tokens": same(cached),
            "static_cache_graphs": int(counters["stats"]["unique_graphs"])}


def forced_length_model(model_name: str, model_dims: str, data: Path, step: str = "") -> str:
    """A checkpoint that never ends a caption early (the end token suppressed): the built-in tiny
    model's weights or random whisper-base/-small-dims weights, saved once in ``data``; ``step``:
    recording a fit window of that many seconds a step (else the default, full)."""
    folder = data / (f"model-{model_dims}-forced-v2" + (f"-fit-step-{step}" if step else ""))
    if (folder / "config.json").exists():
        return str(folder)
    import torch

    from bench.train_step import MODEL_DIMS, dims_model
    from pipeline.model import caption_generation_config, load_model, load_processor, save_model
    from pipeline.window import AudioWindow

    processor = load_processor(model_name)
    tid = processor.tokenizer.convert_tokens_to_ids
    if model_dims in MODEL_DIMS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = dims_model(model_dims, processor.tokenizer)
        model.generation_config = caption_generation_config(processor.tokenizer, model.generation_config)
    else:
        model = load_model(model_name, processor)
    # the end token too (timestamp tokens already are, by caption_generation_config)
    gen = model.generation_config
    gen.suppress_tokens = sorted({*gen.suppress_tokens, tid("<|endoftext|>")})
    save_model(model, processor, folder, window=AudioWindow.parse("fit", float(step)) if step else AudioWindow())
    return str(folder)


def window_row(spec: str) -> str:
    window, _, step = spec.partition(":")
    return f"infer_stream.py --shards --audio-window {window}" + (f" (model recording a {step}-s step)" if step else "")


def captions(path: Path) -> dict[str, str]:
    """Each clip's caption in an ``infer_stream.py --output`` file."""
    from pipeline.predictions import read_rows

    return {row["key"]: row["pred_caption"] for row in read_rows(path)}


def infer_stream_row(source: list[str], out: Path, env: dict, model: str, batch_size: int, workers: int,
                     max_new_tokens: int, extra: tuple[str, ...] = (), root: Path = ROOT) -> dict:
    """``root``: the tree whose ``infer_stream.py`` runs (another revision's for ``--baseline``)."""
    proc = subprocess.run([sys.executable, str(root / "infer_stream.py"), "--model_name", model, *source,
                           "--batch_size", str(batch_size), "--num_dataloader_workers", str(workers),
                           "--max_new_tokens", str(max_new_tokens), "--output", str(out), "--metrics", "bleu", *extra],
                          cwd=root, env={**env, "PYTHONPATH": str(root)}, check=True, capture_output=True, text=True)
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every row runs")
    parser.add_argument("--model-dims", choices=("tiny", *MODEL_DIMS), default="tiny")
    parser.add_argument("--fp32", action="store_true", help="float32 on CUDA too (default there: bfloat16)")
    parser.add_argument("--decode-batches", type=int, default=4, help="timed batches of the decoding rows")
    parser.add_argument("--seed", action=argparse.BooleanOptionalAction, default=True,
                        help="the seed's row (--no-seed: left out, e.g. where its float32 batch would not fit)")
    parser.add_argument("--audio-window", type=check_window, nargs="+", default=[], metavar="W",
                        help="a row per value: infer_stream.py --shards --audio-window W (full, fit, seconds, "
                             "fit:STEP)")
    parser.add_argument("--only-windows", action="store_true",
                        help="only the plain --shards row, the --audio-window rows and --baseline's")
    parser.add_argument("--baseline", help="git revision whose infer_stream.py --shards adds a row (e.g. main)")
    parser.add_argument("--seed-row", action="store_true", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--decode-rows", action="store_true", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model", help=argparse.SUPPRESS)  # child process: the checkpoint
    args = parser.parse_args()
    if args.seed_row:
        print(json.dumps(seed_row(args.data, args.model, args.device, args.batch_size, args.workers,
                                  args.max_new_tokens)))
        return
    if args.decode_rows:
        print(json.dumps(decode_rows(args.model, args.device, args.fp32, args.batch_size, args.decode_batches,
                                     args.max_new_tokens)))
        return

    data = args.data or Path(tempfile.mkdtemp(prefix="bench_infer_"))
    if not (data / "corpus" / "train").is_dir():
        from shard_tools.synth import make_corpus

        make_corpus(data / "corpus", train=args.clips, validation=0, min_seconds=args.min_seconds,
                    max_seconds=args.max_seconds)
    if not (data / "shards" / "train" / "index.json").exists():
        subprocess.run([sys.executable, "-m", "shard_tools.pack", str(data / "corpus"), "--out", str(data / "shards")],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    models = {step: forced_length_model("tiny", args.model_dims, data, step)
              for step in {"", *(spec.partition(":")[2] for spec in args.audio_window)}}
    baseline = None
    if args.baseline:
        from bench.baseline import checkout

        baseline = checkout(args.baseline)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    paths = ([ROWS[2]] if args.only_windows else list(ROWS if args.seed else ROWS[1:]))
    paths += [window_row(spec) for spec in args.audio_window] + ([baseline_row(args.baseline)] if baseline else [])
    rows = {name: [] for name in paths + ([] if args.only_windows else list(DECODE_ROWS))}
    agree = {}  # row: share of its captions equal to the plain --shards row's, the lowest over rounds
    identical, same_tokens, cached_same, graphs = [], [], [], 0
    for _ in range(args.rounds):  # rows interleaved, so a busy spell on the machine hits all of them
        seconds, same, decoded, shares = one_round(data, models, baseline, args)
        for name, value in seconds.items():
            rows[name].append(value)
        for name, share in shares.items():
            agree[name] = min(share, agree.get(name, 1.0))
        if decoded:
            identical += [same, decoded["identical"]]
            same_tokens.append(decoded["same_tokens"])
            cached_same.append(decoded["static_cache_same_tokens"])
            graphs = max(graphs, decoded["static_cache_graphs"])

    dtype = "bfloat16" if args.device == "cuda" and not args.fp32 else "float32"
    print(f"\n{args.clips} clips, model {args.model_dims} (random weights, every caption {args.max_new_tokens} "
          f"tokens), greedy, batch {args.batch_size}, {args.workers} DataLoader workers, device {args.device} "
          f"({dtype} in infer_stream.py and the decoding rows), {os.cpu_count()} cores, torch threads "
          f"{args.threads}, best and median of {args.rounds} interleaved rounds; load average before: {load}\n")
    windows = bool(args.audio_window or baseline)
    print(f"| path | best s | clips/s (best) | clips/s (median) | vs {paths[0].split(':')[0]} (best) |"
          + (" vs full window (best) | captions equal to --shards's |\n|---|---|---|---|---|---|---|" if windows
             else "\n|---|---|---|---|---|"))
    first_best = min(rows[paths[0]])
    full_best = min(rows[window_row(FULL)] if FULL in args.audio_window else rows[ROWS[2]])
    for name in paths:
        best, median = min(rows[name]), statistics.median(rows[name])
        print(f"| {name} | {best:.1f} | {args.clips / best:.1f} | {args.clips / median:.1f} "
              f"| {first_best / best:.2f}x |" + (f" {full_best / best:.2f}x | {agreement(name, agree)} |"
                                                 if windows else ""))
    if args.only_windows:
        print(f"(work folder: {data})")
        return
    decode_clips = args.batch_size * args.decode_batches
    print(f"\nDecoding the same {args.decode_batches} batches of {args.batch_size} (in one process):\n")
    print("| path | best s | clips/s (best) | clips/s (median) | vs generate_captions hf (best) |\n"
          "|---|---|---|---|---|")
    hf_best = min(rows[DECODE_ROWS[2]])
    for name in DECODE_ROWS:
        best, median = min(rows[name]), statistics.median(rows[name])
        print(f"| {name} | {best:.2f} | {decode_clips / best:.1f} | {decode_clips / median:.1f} "
              f"| {hf_best / best:.2f}x |")
    print(f"\nstatic vs HF infer_stream.py --shards (best): {min(rows[ROWS[1]]) / min(rows[ROWS[2]]):.2f}x; "
          f"outputs identical (predictions, token ids) in every round: {all(identical)}; "
          f"share of equal tokens, decoding rows: {min(same_tokens):.4f}")
    print(f"{DECODE_ROWS[3]}: graphs torch.compile made: {graphs} (on a CPU transformers compiles none); "
          f"share of its tokens equal to HF's plain generate: {min(cached_same):.4f}; static decoder vs it "
          f"(best): {min(rows[DECODE_ROWS[3]]) / min(rows[DECODE_ROWS[1]]):.2f}x")
    print(f"(work folder: {data})")


def agreement(name: str, agree: dict[str, float]) -> str:
    if name == ROWS[2]:
        return "(the reference)"
    return f"{agree[name]:.4f}" if name in agree else "-"


def baseline_row(rev: str) -> str:
    return f"infer_stream.py --shards ({rev})"


def one_round(data: Path, models: dict[str, str], baseline: Path | None,
              args) -> tuple[dict, bool | None, dict | None, dict]:
    """``(seconds per row, --shards predictions identical, the decoding rows' result, each window and
    baseline row's share of captions equal to the plain --shards row's)``, each row (the decoding rows
    together) in a fresh process; ``--only-windows``: no comparison of decoders, no decoding rows."""
    model = models[""]
    common = (model, args.batch_size, args.workers, args.max_new_tokens)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # infer_stream.py takes a GPU wherever it sees one
    child = [sys.executable, __file__, "--data", str(data), "--model", model, "--device", args.device,
             "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--max-new-tokens",
             str(args.max_new_tokens), "--decode-batches", str(args.decode_batches)] + (["--fp32"] if args.fp32 else [])
    results = {}
    if args.seed and not args.only_windows:
        seed = subprocess.run(child + ["--seed-row"], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        results[ROWS[0]] = json.loads(seed.stdout.strip().splitlines()[-1])
    shards = ["--shards", str(data / "shards" / "train")]
    precision = ("--fp32",) if args.fp32 else ()
    if not args.only_windows:
        results[ROWS[1]] = infer_stream_row(shards, data / "shards-hf.jsonl", env, *common,
                                            ("--decoder", "hf", *precision))
    results[ROWS[2]] = infer_stream_row(shards, data / "shards.jsonl", env, *common, precision)
    if not args.only_windows:
        results[ROWS[3]] = infer_stream_row(["--audio", str(data / "corpus" / "train")], data / "audio.jsonl", env,
                                            *common, precision)
    outputs = {}  # row: its predictions file, compared with the plain --shards row's
    for number, spec in enumerate(args.audio_window):
        window, _, step = spec.partition(":")
        outputs[window_row(spec)] = data / f"shards-window-{number}.jsonl"
        results[window_row(spec)] = infer_stream_row(shards, outputs[window_row(spec)], env, models[step],
                                                     *common[1:], ("--audio-window", window, *precision))
    if baseline:
        outputs[baseline_row(args.baseline)] = data / "shards-baseline.jsonl"
        results[baseline_row(args.baseline)] = infer_stream_row(shards, outputs[baseline_row(args.baseline)], env,
                                                                *common, precision, root=baseline)
    for name, result in results.items():
        if result["clips"] != args.clips:
            raise RuntimeError(f"{name} captioned {result['clips']} clips, not {args.clips}: {result}")
    reference = captions(data / "shards.jsonl")
    shares = {name: sum(reference[key] == caption for key, caption in captions(path).items()) / len(reference)
              for name, path in outputs.items()}
    seconds = {name: result["seconds"] for name, result in results.items()}
    if args.only_windows:
        return seconds, None, None, shares
    same = (data / "shards-hf.jsonl").read_text() == (data / "shards.jsonl").read_text()
    # stderr passes through: each decoding row's time shows as it ends, kept if a later one runs out of time
    decode = subprocess.run(child + ["--decode-rows"], cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE, text=True)
    decoded = json.loads(decode.stdout.strip().splitlines()[-1])
    return seconds | decoded["seconds"], same, decoded, shares


if __name__ == "__main__":
    main()
