"""Training step rate with data streamed from shards against the same step fed from memory: the data path's cost.

    python bench/train_step.py [--clips 320] [--batch-size 16] [--steps 30 --warmup 5] [--workers 0 1]
    python bench/train_step.py --device cuda --model-dims whisper-small --bf16 --peak-tflops 989 [--shards URLS]

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
``--baseline REV`` adds REV's rows, measured by REV's own ``bench/train_step.py`` in the same run. The default corpus is 320 synthetic clips, 20 batches of 16 per epoch,
so the timed window crosses an epoch boundary, where non-persistent workers (the config default)
are started again: that cost is in the streamed rows, as it is in a training run.

Models: ``tiny`` is ``pipeline.model.load_model("tiny")``; ``--model-dims whisper-small`` builds random
weights with openai/whisper-small's dimensions from ``WhisperConfig`` (d_model 768, 12 + 12 layers,
12 heads, ffn 3072, 80 mels, vocabulary 51,865). FLOPs per step, printed with the table:
  6 x params x tokens, tokens = batch x (1500 encoder frames + decoder length T of the batch),
the usual estimate, which counts every parameter for every token (encoder tokens never touch the
decoder's) and leaves out attention scores; a second column splits it:
  6 x batch x (enc_params x 1500 + dec_params x T) + 12 x batch x d_model x
  (enc_layers x 1500^2 + dec_layers x (T^2 + 1500 T))     (attention scores, PaLM's convention).
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

ENCODER_TOKENS = 1500  # 3000 log-mel frames after the encoder's stride-2 convolution
# openai/whisper-small's config.json dimensions; its token ids are the built-in tokenizer's.
WHISPER_SMALL = dict(vocab_size=51865, d_model=768, encoder_layers=12, decoder_layers=12,
                     encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                     decoder_ffn_dim=3072, num_mel_bins=80, max_source_positions=1500, max_target_positions=448)


def build_run(shards: str, batch_size: int, workers: int, bf16: bool, model_dims: str):
    """Config, accelerator, model, optimizer and training loader exactly as ``prepare_run`` makes them,
    except that ``--model-dims whisper-small`` swaps in a random-weight model of that size."""
    import torch
    from accelerate.utils import set_seed

    import train_stream as ts
    from pipeline.model import load_processor
    from pipeline.optim import make_optimizer

    cfg = ts.build_config(["--shards", shards, f"trainer_config.per_device_train_batch_size={batch_size}",
                           f"trainer_config.dataloader_num_workers={workers}", f"trainer_config.bf16={bf16}"])
    accelerator = ts.make_accelerator(cfg)
    tc = cfg.trainer_config
    set_seed(tc.seed)
    if model_dims == "whisper-small":
        processor = load_processor(cfg.model_config.name)  # tiny's tokenizer: whisper-small's token ids
        model = small_model(processor.tokenizer, cfg.model_config)
    else:
        processor, model = ts.build_model(cfg)
    model.train()
    set_seed(tc.seed, device_specific=True)
    loader = ts.build_loader(cfg, processor.tokenizer, accelerator, train=True)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, tc))
    return cfg, accelerator, model, optimizer, loader


def small_model(tokenizer, model_config):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    import train_stream as ts

    tid = tokenizer.convert_tokens_to_ids
    eot = tid("<|endoftext|>")
    config = WhisperConfig(**WHISPER_SMALL, decoder_start_token_id=tid("<|startoftranscript|>"),
                           pad_token_id=eot, bos_token_id=eot, eos_token_id=eot)
    model = WhisperForConditionalGeneration(config)
    model.set_attn_implementation(model_config.attn_implementation)
    ts.apply_model_options(model, model_config)
    return model


def timed_steps(batches, cfg, accelerator, model, optimizer, warmup: int, steps: int) -> dict:
    """``warmup`` + ``steps`` optimizer steps as ``Trainer.run`` takes them (one micro-batch each, the
    statistics read one step late); wall time, data wait, samples and decoder tokens of the timed ones."""
    import torch

    import train_stream as ts
    from pipeline.optim import lr_at

    tc = cfg.trainer_config
    wait, samples, decoder_tokens, flight, values = 0.0, 0, 0, None, {}
    for step in range(warmup + steps):
        if step == warmup:
            sync(accelerator)
            start = time.perf_counter()
        stats = torch.zeros(len(ts.STATS), dtype=torch.float64, device=accelerator.device)
        waited = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - waited
        ts.train_step(model, batch, accelerator, stats)
        reduced, _, norm = ts.optimizer_step(model, optimizer, accelerator, stats, lr_at(step, tc, tc.max_steps),
                                             tc.max_grad_norm)
        launched = ts.to_host(torch.cat([reduced, norm.double().view(1)]))
        if flight is not None:
            values = read(flight)
        flight = launched
        if step >= warmup:
            wait += waited
            samples += len(batch["is_pad"]) - int(batch["is_pad"].sum())
            decoder_tokens += batch["labels"].numel()  # [B, T]: the decoder runs on padded positions too
    values = read(flight)
    sync(accelerator)
    return {"steps": steps, "seconds": time.perf_counter() - start, "wait_s": wait, "samples": samples,
            "decoder_tokens_per_step": decoder_tokens / steps, "loss": values["loss"]}


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


def flops_per_step(model, batch_size: int, decoder_len: float) -> dict:
    """The two estimates of the module doc, for one step of ``batch_size`` clips, decoder length T."""
    whisper = model.model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    params, enc, dec = count(model), count(whisper.encoder), count(whisper.decoder)
    c, t, e = model.config, decoder_len, ENCODER_TOKENS
    simple = 6 * params * batch_size * (e + t)
    attention = 12 * batch_size * c.d_model * (c.encoder_layers * e * e + c.decoder_layers * (t * t + e * t))
    split = 6 * batch_size * (enc * e + dec * t) + attention
    return {"params": params, "flops_simple": simple, "flops_split": split}


def measure(path: str, shards: str, args) -> dict:
    """One row, in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU-only torch)")
    workers = 0 if path == "memory" else int(path.removeprefix("seed"))
    cfg, accelerator, model, optimizer, loader = build_run(shards, args.batch_size, 0 if path.startswith("seed")
                                                           else workers, args.bf16, args.model_dims)
    batches = iter(loader)
    if path == "memory":
        batches = itertools.repeat(next(batches))  # the stream's first batch, as the loader hands it over
    elif path.startswith("seed"):
        batches = seed_batches(Path(shards).parent.parent / "corpus", cfg, args.batch_size, workers)
    row = timed_steps(batches, cfg, accelerator, model, optimizer, args.warmup, args.steps)
    row.update(flops_per_step(accelerator.unwrap_model(model), args.batch_size, row["decoder_tokens_per_step"]))
    row.update(path=path, workers=workers, threads=torch.get_num_threads(), device=str(accelerator.device),
               precision=accelerator.mixed_precision)
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
               "keys": [str(i) for i in range(count)],
               "decoder_input_ids": shift_tokens_right(batch["labels"], tokenizer.pad_token_id, start)}


def make_shards(data: Path, clips: int) -> str:
    """``data/corpus`` from shard_tools.synth, packed into ``data/shards``; reused when present."""
    corpus, shards = data / "corpus", data / "shards"
    if not (corpus / "train").is_dir():
        subprocess.run([sys.executable, "-m", "shard_tools.synth", str(corpus), "--train", str(clips),
                        "--validation", "0"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if not (shards / "train" / "index.json").exists():
        subprocess.run([sys.executable, "-m", "shard_tools.pack", str(corpus), "--out", str(shards)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return str(shards / "train")


def child_command(args, path: str, shards: str) -> list[str]:
    cmd = [sys.executable, __file__, "--one", path, "--shards", shards, "--device", args.device,
           "--model-dims", args.model_dims, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + (["--bf16"] if args.bf16 else [])


def print_table(rows: list[dict], args) -> None:
    first = rows[0]
    print(f"\nmodel {args.model_dims} ({first['params'] / 1e6:.1f} M parameters), batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, device {first.get('gpu', first['device'])}, "
          f"precision {first['precision']}, {os.cpu_count()} cores, torch threads {first['threads']}\n")
    mfu = args.peak_tflops is not None
    print("| path | workers | steps/s | samples/s | data-wait % | vs in-memory"
          + (" | TFLOP/s | MFU | MFU (split) |" if mfu else " |"))
    print("|---|---|---|---|---|---" + ("|---|---|---|" if mfu else "|"))
    base = {r["code"]: r["steps"] / r["seconds"] for r in rows if r["path"] == "memory"}  # each code's own
    for r in rows:
        rate = r["steps"] / r["seconds"]
        name = {"memory": "in-memory (one batch reused)", "seed": "seed loader"}.get(
            r["path"].rstrip("0123456789"), "streamed from shards") + r["code"]
        workers = "-" if r["path"] == "memory" else str(r["workers"])
        line = (f"| {name} | {workers} | {rate:.2f} | {r['samples'] / r['seconds']:.1f} | "
                f"{100 * r['wait_s'] / r['seconds']:.1f} | {rate / base[r['code']]:.2f}x")
        if mfu:
            peak = args.peak_tflops * 1e12
            line += (f" | {r['flops_simple'] * rate / 1e12:.1f} | {100 * r['flops_simple'] * rate / peak:.1f}% | "
                     f"{100 * r['flops_split'] * rate / peak:.1f}%")
        print(line + " |")
    print(f"\nFLOPs per step = 6 x params x batch x (1500 + T), T = mean padded decoder length "
          f"({first['decoder_tokens_per_step'] / args.batch_size:.1f} in the in-memory batch): "
          f"{first['flops_simple'] / 1e12:.3f} TFLOP for the in-memory row; split estimate (module doc) "
          f"{first['flops_split'] / 1e12:.3f} TFLOP." + ("" if mfu else " MFU: pass --peak-tflops."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=320, help="synthetic training clips to generate")
    parser.add_argument("--shards", help="training shard URLs to read instead of generating a corpus")
    parser.add_argument("--data", type=Path, help="work folder to reuse (corpus/ and shards/)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="streamed rows' loader workers")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model-dims", choices=("tiny", "whisper-small"), default="tiny")
    parser.add_argument("--bf16", action="store_true", help="trainer_config.bf16=true (mixed precision)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s at this precision, for MFU")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, as train_stream.py)")
    parser.add_argument("--seed-workers", type=int, nargs="*", default=[], help="seed loader rows' workers")
    parser.add_argument("--baseline", help="git revision whose bench/train_step.py adds its rows (e.g. main)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: measure one row, print it as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.shards, args)))
        return

    shards = args.shards or make_shards((args.data or Path(tempfile.mkdtemp(prefix="bench_train_step_"))).resolve(),
                                        args.clips)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # as make_loader sets it for workers
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # else accelerate would pick a GPU that is there
    codes = [("", Path(__file__))]
    if args.baseline:
        from bench.baseline import checkout

        codes.insert(0, (f" ({args.baseline})", checkout(args.baseline) / "bench" / "train_step.py"))
    rows = []
    for path in ["memory", *map(str, args.workers), *(f"seed{w}" for w in args.seed_workers)]:
        for label, script in codes[-1:] if path.startswith("seed") else codes:  # REV's script has no seed row
            cmd = child_command(args, path, shards)
            out = subprocess.run([cmd[0], str(script), *cmd[2:]], capture_output=True, text=True, env=env,
                                 cwd=script.resolve().parent.parent)
            if out.returncode:
                sys.exit(f"row {path!r}{label} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "code": label})
            print(f"row {path}{label}: {json.dumps(rows[-1])}", flush=True)  # kept if a later row runs out of time
    print_table(rows, args)
    print(f"(shards: {shards})")


if __name__ == "__main__":
    main()
