"""Training step rate with data streamed from shards against the same step fed from memory: the data path's cost.

    python bench/train_step.py [--clips 320] [--batch-size 16] [--steps 30 --warmup 5] [--workers 0 1]
    python bench/train_step.py --device cuda --model-dims whisper-small --bf16 --peak-tflops 989 [--shards URLS]
    python bench/train_step.py --clip-seconds 10 --audio-window full fit [--model-dims whisper-base] [--workers]

Every row runs train_stream.py's own step, imported, not re-implemented: the config from
``build_config``, the ``Accelerator`` from ``make_accelerator``, the loader from ``build_loader``
(``pipeline.stream.make_loader`` with the config's prefetch, pinning and worker settings, its batches
on the device), ``make_optimizer``, then per step ``next(loader)`` timed as ``Trainer.accumulate``
times it, ``train_step``, ``optimizer_step`` (the per-step all-reduce of the statistics inside) and the
statistics' copy to the host, read one step later as ``Trainer.run`` does. Rows, each in a fresh
process, same model, seed and batch size:
- in-memory: ONE batch (the stream's first), held as the loader delivers it (compact, on the
  device) and reused every step; its data wait is the cost of ``next`` on ``itertools.repeat``;
- streamed, N workers: the infinite training loader over the shards, N = each ``--workers`` value;
- seed loader, N workers (``--seed-workers``, generated corpus only): ``bench/stream.py``'s
  ``seed_loader`` (decode, resample and ``WhisperFeatureExtractor`` per item), its padded batches
  given to the same step (their width is already 3000 frames, so the step pads nothing).
steps/s counts ``--steps`` steps after ``--warmup`` untimed ones (the device is waited for before and
after them, not between); data wait % is the time blocked in ``next(loader)`` over that time.
``--rounds N`` runs every row N times, the rows interleaved, and keeps each row's fastest round: on a
shared machine one row can land in a busy spell.
``--baseline REV`` adds REV's rows, measured by REV's own ``bench/train_step.py`` in the same run
(without ``--audio-window``: REV's window is its own). The default corpus is 320 synthetic clips
of 1-3.5 s, 20 batches of 16 per epoch, so the timed window crosses an epoch boundary, where
non-persistent workers (the config default) are started again: that cost is in the streamed rows, as
it is in a training run. ``--clip-seconds S`` generates clips of exactly S seconds instead,
``--clip-seconds A B`` clips of A-B seconds (in ``DATA/clips-S/``).

Encoder windows: each ``--audio-window`` value (``full``, ``fit``, seconds; ``fit:STEP`` sets
``model_config.audio_window_step``) gives every memory and streamed row once, as
``model_config.audio_window`` in the row's config (the step reads it as ``Trainer`` does); the
"vs full" column divides a row's samples/s by the same path's ``full`` row. The seed loader's
batches are 3,000 frames wide, so its rows run once, in a ``full`` window. A 10-s clip has 1,002
valid frames (``shard_tools.features.valid_frames``), so ``fit`` with the default 5-s step gives it a
15-s window; ``fit:1`` an 11-s one; a fixed ``10`` cuts 2 frames of every clip (the "cut" column).

Models: ``tiny`` is ``pipeline.model.load_model("tiny")``; ``--model-dims whisper-base`` and
``whisper-small`` build random weights with openai/whisper-base's dimensions (d_model 512, 6 + 6
layers, 8 heads, ffn 2048) or openai/whisper-small's (d_model 768, 12 + 12 layers, 12 heads, ffn 3072)
from ``WhisperConfig`` (80 mels, vocabulary 51,865), with the fitted encoder ``load_model`` gives.
FLOPs per step, printed with the table, averaged over the timed steps:
  6 x params x tokens, tokens = batch x (E encoder positions + decoder length T of the batch),
E = the step's window frames / 2 (1500 in a full window), the usual estimate, which counts every
parameter for every token (encoder tokens never touch the decoder's) and leaves out attention scores;
a second column splits it:
  6 x batch x (enc_params x E + dec_params x T) + 12 x batch x d_model x
  (enc_layers x E^2 + dec_layers x (T^2 + E T))     (attention scores, PaLM's convention).
MFU = FLOPs per step x steps/s / (``--peak-tflops`` x 1e12): the TFLOP/s and MFU columns appear when
``--peak-tflops`` is given. Torch threads: torch's default unless ``--threads`` (train_stream.py sets none).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# openai/whisper-base's and whisper-small's config.json dimensions; their token ids are the built-in tokenizer's.
WHISPER_SHARED = dict(vocab_size=51865, num_mel_bins=80, max_source_positions=1500, max_target_positions=448)
MODEL_DIMS = {
    "whisper-base": dict(WHISPER_SHARED, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                         decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048),
    "whisper-small": dict(WHISPER_SHARED, d_model=768, encoder_layers=12, decoder_layers=12,
                          encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                          decoder_ffn_dim=3072),
}
FULL = "full"


def window_overrides(spec: str) -> list[str]:
    """The config overrides of an ``--audio-window`` value: ``full``, ``fit``, seconds, ``fit:STEP``,
    each optionally with ``+bN``: length bucketing in pools of N batches (``data_config.bucket_pool_batches``)."""
    spec, _, pools = spec.partition("+b")
    window, _, step = spec.partition(":")
    return ([f"model_config.audio_window={window}"] + ([f"model_config.audio_window_step={step}"] if step else [])
            + ([f"data_config.bucket_pool_batches={pools}"] if pools else []))


def check_window(spec: str) -> str:
    """argparse type: the value if ``AudioWindow.parse`` takes it, else the option and the reason."""
    from pipeline.window import AudioWindow

    window, _, pools = spec.partition("+b")
    window, _, step = window.partition(":")
    try:
        AudioWindow.parse(window, *([float(step)] if step else []))
        if pools and int(pools) < 1:
            raise ValueError(f"+b{pools}: pools of at least 1 batch")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{spec!r}: {error} (a fit step: fit:SECONDS; bucketing: +bN)") from None
    return spec


def build_run(shards: str, batch_size: int, workers: int, bf16: bool, model_dims: str, window: str = FULL):
    """Config, accelerator, model, optimizer and training loader exactly as ``prepare_run`` makes them,
    except that ``--model-dims whisper-base/-small`` swaps in a random-weight model of that size."""
    from accelerate.utils import set_seed

    import train_stream as ts
    from pipeline.model import load_processor
    from pipeline.optim import make_optimizer

    cfg = ts.build_config(["--shards", shards, f"trainer_config.per_device_train_batch_size={batch_size}",
                           f"trainer_config.dataloader_num_workers={workers}", f"trainer_config.bf16={bf16}",
                           *window_overrides(window)])
    accelerator = ts.make_accelerator(cfg)
    tc = cfg.trainer_config
    set_seed(tc.seed)
    if model_dims in MODEL_DIMS:
        processor = load_processor(cfg.model_config.name)  # tiny's tokenizer: whisper-base/-small's token ids
        model = random_model(model_dims, processor.tokenizer, cfg.model_config)
    else:
        processor, model = ts.build_model(cfg)
    model.train()
    set_seed(tc.seed, device_specific=True)
    loader = ts.build_loader(cfg, processor.tokenizer, accelerator, train=True)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, tc))
    return cfg, accelerator, model, optimizer, loader


def dims_model(model_dims: str, tokenizer):
    """Random weights with ``MODEL_DIMS[model_dims]``, the token ids of ``tokenizer``, the encoder fitted."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from pipeline.model import fit_encoder

    tid = tokenizer.convert_tokens_to_ids
    eot = tid("<|endoftext|>")
    config = WhisperConfig(**MODEL_DIMS[model_dims], decoder_start_token_id=tid("<|startoftranscript|>"),
                           pad_token_id=eot, bos_token_id=eot, eos_token_id=eot)
    return fit_encoder(WhisperForConditionalGeneration(config))


def random_model(model_dims: str, tokenizer, model_config):
    import train_stream as ts

    model = dims_model(model_dims, tokenizer)
    model.set_attn_implementation(model_config.attn_implementation)
    ts.apply_model_options(model, model_config)
    return model


def timed_steps(batches, cfg, accelerator, model, optimizer, warmup: int, steps: int) -> dict:
    """``warmup`` + ``steps`` optimizer steps as ``Trainer.run`` takes them (one micro-batch each, the
    statistics read one step late); wall time, data wait, samples, clips cut by the window and each
    step's (window frames, decoder length) of the timed ones."""
    import torch

    import train_stream as ts
    from pipeline.optim import lr_at

    tc = cfg.trainer_config
    window = cfg.model_config.window()
    wait, samples, shapes, cut, flight, values = 0.0, 0, [], 0.0, None, {}
    for step in range(warmup + steps):
        if step == warmup:
            sync(accelerator)
            start = time.perf_counter()
        stats = torch.zeros(len(ts.STATS), dtype=torch.float64, device=accelerator.device)
        waited = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - waited
        ts.train_step(model, batch, accelerator, stats, tc.label_smoothing, window)
        reduced, _, norm = ts.optimizer_step(model, optimizer, accelerator, stats, lr_at(step, tc, tc.max_steps),
                                             tc.max_grad_norm)
        launched = ts.to_host(torch.cat([reduced, norm.double().view(1)]))
        if flight is not None:
            values = read(flight)
            cut += values["cut"] if step > warmup else 0  # the previous step's: a timed one
        flight = launched
        if step >= warmup:
            wait += waited
            samples += len(batch["is_pad"]) - int(batch["is_pad"].sum())
            # [B, T] labels: the decoder runs on padded positions too
            shapes.append((window.frames(batch["input_features"].shape[-1]), batch["labels"].shape[-1]))
    values = read(flight)
    sync(accelerator)
    return {"steps": steps, "seconds": time.perf_counter() - start, "wait_s": wait, "samples": samples,
            "shapes": shapes, "cut": cut + values["cut"], "loss": values["loss"]}


def read(launched) -> dict:
    """A step's reduced statistics, as ``Trainer.settle`` reads them."""
    import train_stream as ts

    host, copied = launched
    if copied is not None:
        copied.synchronize()
    return dict(zip(ts.STATS, host.tolist()))


def sync(accelerator) -> None:
    import torch

    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)


def flops_per_step(model, batch_size: int, shapes: list[tuple[int, int]]) -> dict:
    """The two estimates of the module doc for steps of ``batch_size`` clips, each of ``shapes``
    (window frames, decoder length T), averaged; and the mean encoder positions and T."""
    from pipeline.window import FRAMES_PER_POSITION

    whisper = model.model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    params, enc, dec, c = count(model), count(whisper.encoder), count(whisper.decoder), model.config
    simple = split = positions = decoder_len = 0.0
    for frames, t in shapes:
        e = frames / FRAMES_PER_POSITION
        attention = 12 * batch_size * c.d_model * (c.encoder_layers * e * e + c.decoder_layers * (t * t + e * t))
        simple += 6 * params * batch_size * (e + t)
        split += 6 * batch_size * (enc * e + dec * t) + attention
        positions, decoder_len = positions + e, decoder_len + t
    n = len(shapes)
    return {"params": params, "flops_simple": simple / n, "flops_split": split / n, "encoder_positions": positions / n,
            "decoder_len": decoder_len / n}


def measure(path: str, shards: str, args) -> dict:
    """One row, in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU-only torch)")
    workers = 0 if path == "memory" else int(path.removeprefix("seed"))
    cfg, accelerator, model, optimizer, loader = build_run(shards, args.batch_size, 0 if path.startswith("seed")
                                                           else workers, args.bf16, args.model_dims, args.window)
    batches = iter(loader)
    if path == "memory":
        batches = itertools.repeat(next(batches))  # the stream's first batch, as the loader hands it over
    elif path.startswith("seed"):
        batches = seed_batches(Path(shards).parent.parent / "corpus", cfg, args.batch_size, workers)
    row = timed_steps(batches, cfg, accelerator, model, optimizer, args.warmup, args.steps)
    row.update(flops_per_step(accelerator.unwrap_model(model), args.batch_size, row.pop("shapes")))
    row.update(path=path, window=args.window, workers=workers, threads=torch.get_num_threads(),
               device=str(accelerator.device), precision=accelerator.mixed_precision)
    if accelerator.device.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(accelerator.device)
    return row


def seed_batches(corpus: Path, cfg, batch_size: int, workers: int):
    """The seed loader's batches, epoch after epoch, in the step's batch form: the decoder inputs
    are the labels shifted right, as the seed's model made them itself (no caption prefix)."""
    import torch
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    from bench.stream import seed_loader
    from pipeline.model import load_processor

    tokenizer = load_processor(cfg.model_config.name).tokenizer
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    loader = seed_loader(corpus, tokenizer, batch_size, workers)
    for batch in (b for _ in itertools.count() for b in loader):
        count = len(batch["labels"])
        yield {**batch, "pad_values": torch.zeros(count), "is_pad": torch.zeros(count, dtype=torch.bool),
               "frames": torch.full((count,), batch["input_features"].shape[-1]),  # padded by the extractor
               "keys": [str(i) for i in range(count)],
               "decoder_input_ids": shift_tokens_right(batch["labels"], tokenizer.pad_token_id, start)}


def make_shards(data: Path, clips: int, seconds: list[float] | None = None) -> str:
    """``data/corpus`` from shard_tools.synth (``seconds``: clips of [S] or [A, B] seconds, in
    ``data/clips-S`` or ``data/clips-A-B``), packed into ``shards`` beside it; reused when present."""
    if seconds:
        data = data / ("clips-" + "-".join(f"{s:g}" for s in seconds) + "s")
    corpus, shards = data / "corpus", data / "shards"
    if not (corpus / "train").is_dir():
        durations = ["--min-seconds", str(seconds[0]), "--max-seconds", str(seconds[-1])] if seconds else []
        subprocess.run([sys.executable, "-m", "shard_tools.synth", str(corpus), "--train", str(clips),
                        "--validation", "0", *durations], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if not (shards / "train" / "index.json").exists():
        subprocess.run([sys.executable, "-m", "shard_tools.pack", str(corpus), "--out", str(shards)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return str(shards / "train")


def child_command(args, path: str, shards: str, window: str | None) -> list[str]:
    """``window`` None: REV's script, which may not know ``--audio-window``."""
    cmd = [sys.executable, __file__, "--one", path, "--shards", shards, "--device", args.device,
           "--model-dims", args.model_dims, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--window", window] if window else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + (["--bf16"] if args.bf16 else [])


def print_table(rows: list[dict], args, corpus: str) -> None:
    first = rows[0]
    print(f"\nmodel {args.model_dims} ({first['params'] / 1e6:.1f} M parameters), batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.rounds} interleaved rounds, "
          f"device {first.get('gpu', first['device'])}, "
          f"precision {first['precision']}, {os.cpu_count()} cores, torch threads {first['threads']}, {corpus}\n")
    mfu = args.peak_tflops is not None
    print("| path | window | workers | steps/s | samples/s | data-wait % | encoder positions | cut per step "
          "| vs in-memory | vs full" + (" | TFLOP/s | MFU | MFU (split) |" if mfu else " |"))
    print("|---|---|---|---|---|---|---|---|---|---" + ("|---|---|---|" if mfu else "|"))
    samples_rate = lambda r: r["samples"] / r["seconds"]  # noqa: E731
    # each code's and window's own in-memory row; each code's and path's own full-window row
    base = {(r["code"], r["window"]): samples_rate(r) for r in rows if r["path"] == "memory"}
    full = {(r["code"], r["path"]): samples_rate(r) for r in rows if r["window"] == FULL}
    for r in rows:
        rate = samples_rate(r)
        name = {"memory": "in-memory (one batch reused)", "seed": "seed loader"}.get(
            r["path"].rstrip("0123456789"), "streamed from shards") + r["code"]
        workers = "-" if r["path"] == "memory" else str(r["workers"])
        line = (f"| {name} | {r['window']} | {workers} | {r['steps'] / r['seconds']:.2f} | {rate:.2f} | "
                f"{100 * r['wait_s'] / r['seconds']:.1f} | {r['encoder_positions']:.0f} | "
                f"{r['cut'] / r['steps']:.1f} | {times(rate, base.get((r['code'], r['window'])))} | "
                f"{times(rate, full.get((r['code'], r['path'])))}")
        if mfu:
            peak = args.peak_tflops * 1e12
            steps_rate = r["steps"] / r["seconds"]
            line += (f" | {r['flops_simple'] * steps_rate / 1e12:.1f} | "
                     f"{100 * r['flops_simple'] * steps_rate / peak:.1f}% | "
                     f"{100 * r['flops_split'] * steps_rate / peak:.1f}%")
        print(line + " |")
    print(f"\nFLOPs per step = 6 x params x batch x (E + T), E = encoder positions (the window's frames / 2), "
          f"T = mean padded decoder length ({first['decoder_len']:.1f} in the first row): "
          f"{first['flops_simple'] / 1e12:.3f} TFLOP for the first row; split estimate (module doc) "
          f"{first['flops_split'] / 1e12:.3f} TFLOP." + ("" if mfu else " MFU: pass --peak-tflops."))


def times(rate: float, other: float | None) -> str:
    return f"{rate / other:.2f}x" if other else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=320, help="synthetic training clips to generate")
    parser.add_argument("--clip-seconds", type=clip_seconds, nargs="+", metavar="S",
                        help="generated clips of exactly S seconds, or of A-B seconds (two values); default 1-3.5")
    parser.add_argument("--shards", help="training shard URLs to read instead of generating a corpus")
    parser.add_argument("--data", type=Path, help="work folder to reuse (corpus/ and shards/)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=1, help="every row this many times, interleaved; the best kept")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1],
                        help="streamed rows' loader workers (none: the in-memory rows only)")
    parser.add_argument("--audio-window", type=check_window, nargs="+", default=[FULL], metavar="W",
                        help="each value's rows: full, fit, seconds, or fit:STEP (model_config.audio_window[_step]), "
                             "each with an optional +bN: length bucketing in pools of N batches")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model-dims", choices=("tiny", *MODEL_DIMS), default="tiny")
    parser.add_argument("--bf16", action="store_true", help="trainer_config.bf16=true (mixed precision)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s at this precision, for MFU")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, as train_stream.py)")
    parser.add_argument("--seed-workers", type=int, nargs="*", default=[], help="seed loader rows' workers")
    parser.add_argument("--baseline", help="git revision whose bench/train_step.py adds its rows (e.g. main)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: measure one row, print it as JSON
    parser.add_argument("--window", default=FULL, help=argparse.SUPPRESS)  # the child's --audio-window value
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.shards, args)))
        return
    seconds = args.clip_seconds
    if seconds and (len(seconds) > 2 or args.shards or seconds[0] > seconds[-1]):
        parser.error(f"--clip-seconds {' '.join(map(str, args.clip_seconds))}: one length S or a range A B "
                     "(A <= B), for a generated corpus (not with --shards)")

    shards = args.shards or make_shards((args.data or Path(tempfile.mkdtemp(prefix="bench_train_step_"))).resolve(),
                                        args.clips, args.clip_seconds)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # as make_loader sets it for workers
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # else accelerate would pick a GPU that is there
    codes = [("", Path(__file__))]
    if args.baseline:
        from bench.baseline import checkout

        codes.insert(0, (f" ({args.baseline})", checkout(args.baseline) / "bench" / "train_step.py"))
    best = {}  # (path, window, code): the row's fastest round
    for _ in range(args.rounds):  # rows interleaved, so a busy spell on the machine hits all of them
        for path in ["memory", *map(str, args.workers), *(f"seed{w}" for w in args.seed_workers)]:
            # REV's script: no seed row, its own window; the seed loader's batches: a full window only
            runs = [(label, script, None) for label, script in codes[:-1] if not path.startswith("seed")]
            windows = [FULL] if path.startswith("seed") else args.audio_window
            runs += [(codes[-1][0], codes[-1][1], window) for window in windows]
            for label, script, window in runs:
                cmd = child_command(args, path, shards, window)
                out = subprocess.run([cmd[0], str(script), *cmd[2:]], capture_output=True, text=True, env=env,
                                     cwd=script.resolve().parent.parent)
                if out.returncode:
                    sys.exit(f"row {path!r} {window or ''}{label} failed (exit {out.returncode}):\n"
                             f"{out.stderr[-3000:]}")
                row = {**older_row(json.loads(out.stdout.strip().splitlines()[-1]), args.batch_size), "code": label}
                key = (path, row["window"], label)
                if key not in best or row["seconds"] < best[key]["seconds"]:
                    best[key] = row
                # printed as it ends: kept if a later row runs out of time
                print(f"row {path} {row['window']}{label}: {json.dumps(row)}", flush=True)
    rows = list(best.values())
    seconds = "-".join(f"{s:g}" for s in args.clip_seconds) if args.clip_seconds else "1-3.5"
    print_table(rows, args, f"shards {shards}" if args.shards else f"{args.clips} generated clips of {seconds} s")
    print(f"(shards: {shards})")


def older_row(row: dict, batch_size: int) -> dict:
    """A row as this script's table reads it; REV's script (before encoder windows) gave a full
    window's row without its encoder positions, clips cut and mean decoder length."""
    if "window" in row:
        return row
    from pipeline.window import FRAMES_PER_POSITION
    from shard_tools.shard_format import N_FRAMES

    return {**row, "window": FULL, "encoder_positions": N_FRAMES / FRAMES_PER_POSITION, "cut": 0,
            "decoder_len": row["decoder_tokens_per_step"] / batch_size}


def clip_seconds(value: str) -> float:
    """argparse type: seconds in (0, 30], the clips shard_tools.synth makes."""
    from shard_tools.shard_format import CHUNK_LENGTH

    seconds = float(value)
    if not 0 < seconds <= CHUNK_LENGTH:
        raise argparse.ArgumentTypeError(f"{value}: seconds in (0, {CHUNK_LENGTH}]")
    return seconds


if __name__ == "__main__":
    main()
