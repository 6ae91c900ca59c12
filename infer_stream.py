"""Caption streams of shards (or raw audio files) with a Whisper model, write JSONL, and score.

    python infer_stream.py --model-name tiny --shards 'data/test/{000..009}.tar' --output preds.jsonl
    accelerate launch infer_stream.py --model-name outputs/run/final --shards data/test --resume
    python infer_stream.py --model-name outputs/run/final --audio my_sounds/ --print

Each rank captions its share into its own part file; the main process merges them into the output
(each key once) under a lock, and ``--resume`` refuses other settings. Output rows, resume, caption
length and prefixes, why it is built so: docs/inference.md, "How it is built".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

from pipeline import metrics
from pipeline.config import DECODE_METHODS
from pipeline.runs import CAPTION_LENGTH_KEY, caption_length_default
from pipeline.window import AudioWindow, loses_audio

STDOUT = "-"  # --output: the rows to standard output


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; the seed's spellings (``--model_name``, ``--batch_size``, ...) are aliases."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=ShowDefaults)
    parser.add_argument("--model-name", "--model_name", dest="model_name", required=True,
                        help="'tiny', a local checkpoint folder or a Hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="shard URLs: brace/range pattern, glob, folder, index.json, http(s)://, pipe:")
    source.add_argument("--audio", nargs="+", help="audio files and/or folders (searched recursively)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16, help="clips per batch")
    parser.add_argument("--num-dataloader-workers", "--num_dataloader_workers", dest="num_dataloader_workers",
                        type=int, default=4, help="loader worker processes")
    parser.add_argument("--output", default="preds.jsonl",
                        help=f"the predictions, one JSON row per clip ('{STDOUT}': standard output, and the "
                             f"messages go to standard error); a regular file or a new path")
    parser.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=1,
                        help="1: greedy; >1: beam search")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=None,
                        help=f"longest caption in tokens, the end token included (default: the longest "
                             f"caption the checkpoint was trained on, recorded with it by train_stream.py; else "
                             f"{CAPTION_LENGTH_KEY} from the config.yaml saved beside it, i.e. what its "
                             f"evaluation generated; else that key's default, {caption_length_default()})")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prefix", help="caption prefix forced after the task tokens (stripped from the output); "
                        "'' for none. Default: the prefix recorded with the model, the first (highest-weight "
                        "source's) when several are recorded")
    prompt.add_argument("--source", help="use the prefix recorded with the model for this training source")
    parser.add_argument("--decoder", choices=DECODE_METHODS, default=DECODE_METHODS[0],
                        help="static: static KV cache (CUDA graph on a GPU); hf: transformers' generate, "
                             "the reference")
    parser.add_argument("--audio-window", "--audio_window", dest="audio_window",
                        help="what the encoder sees: full (Whisper's 30 s), fit (each batch's longest clip rounded "
                             "up to the model's window step) or seconds (a fixed window, longer clips cut). "
                             "Default: the window recorded with the model by train_stream.py; else full")
    parser.add_argument("--bucket-pool-batches", dest="bucket_pool_batches", type=int, default=8,
                        help="group clips of like lengths into batches (a fit window then pads less): --shards in "
                             "pools of this many batches, --audio files sorted by duration; 0: the inputs' order")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (the default on a GPU)")
    precision.add_argument("--fp32", action="store_true", help="run the model in float32 on a GPU too")
    parser.add_argument("--print", action="store_true", help="also print the list of result rows")
    parser.add_argument("--resume", action="store_true", help="skip keys already in --output (and in part files)")
    parser.add_argument("--metrics-out", "--metrics_out", dest="metrics_out", help="write the scores here as JSON")
    parser.add_argument("--metrics", default=",".join(metrics.GROUPS),
                        help=f"metric groups to compute, comma-separated, from {','.join(metrics.GROUPS)}")
    args = parser.parse_args(argv)
    args.metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = set(args.metrics) - set(metrics.GROUPS)
    if unknown:
        parser.error(f"--metrics: unknown group(s) {sorted(unknown)}; choose from {','.join(metrics.GROUPS)}")
    for option, value, least in (("--batch-size", args.batch_size, 1), ("--num-beams", args.num_beams, 1),
                                 ("--max-new-tokens", args.max_new_tokens, 1),
                                 ("--num-dataloader-workers", args.num_dataloader_workers, 0),
                                 ("--bucket-pool-batches", args.bucket_pool_batches, 0)):
        if value is not None and value < least:
            parser.error(f"{option} {value}: must be at least {least}")
    if args.audio_window is not None:
        try:
            AudioWindow.parse(args.audio_window)
        except ValueError as error:
            parser.error(f"--{error}".replace("_", "-", 1))
    if args.resume and args.output == STDOUT:
        parser.error(f"--resume needs a file --output (not '{STDOUT}'): the rows done are read back from it")
    return args


# Parsed before torch and transformers are imported (below), so that --help and a mistake on the
# command line answer at once.
if __name__ == "__main__":
    CLI_ARGS = parse_args(sys.argv[1:])

import numpy as np
import soundfile
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline import decode
from pipeline.collate import expand_features, prompt_ids
from pipeline.config import ConfigError
from pipeline.runs import caption_length
from pipeline.data_settings import DataSettings
from pipeline.device import in_background, to_device_ahead
from shard_tools.features import AudioDecodeError, clip_features, decode_audio, pad_mel
from shard_tools.fileio import LockBusy, NotRegularFile, check_replaceable, hold_lock, write_atomic
from pipeline.launch import LaunchError, make_accelerator
from pipeline.model import (LANGUAGE, TASK, ModelLoadError, generate_captions, load_model, load_processor,
                            recorded_caption_tokens, recorded_prefixes, recorded_window)
from pipeline.predictions import (RunSettings, merge_outputs, model_identity, open_part, part_files, read_record,
                                  read_rows, resumable_rows, resume_problem, rows_text, settings_file,
                                  write_record)
from shard_tools.shard_format import AUDIO_SUFFIXES, CHUNK_LENGTH
from pipeline.stream import StreamError, make_loader


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """``args``: the options already parsed from the command line (``argv`` is then not read)."""
    args = args or parse_args(argv)
    try:
        accelerator = make_accelerator()
        processor = load_processor(args.model_name, "--model-name")
        model = load_model(args.model_name, processor, "--model-name")
        option = ("--prefix" if args.prefix is not None else f"--source {args.source}" if args.source is not None
                  else f"the caption prefix recorded with {args.model_name}")
        args.prefix = caption_prefix(args, recorded_prefixes(model))  # resolved once: what every batch forces
        check_prompt(model, processor, args, option)
        args.window = audio_window(model, args)
        if args.max_new_tokens is None:
            args.max_new_tokens, args.caption_length_from = default_caption_length(model, args.model_name)
        else:
            args.caption_length_from = "--max-new-tokens"
    except (LaunchError, ModelLoadError, ConfigError, UnknownSource, PromptError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dtype = model_dtype(args, accelerator.device)
    model = model.to(accelerator.device, dtype=dtype).eval()
    settings = RunSettings(model=model_identity(args.model_name), prefix=args.prefix,
                           max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, decoder=args.decoder,
                           dtype=str(dtype).removeprefix("torch."), audio_window=str(args.window))

    output = Path(args.output)
    with contextlib.ExitStack() as lock:
        problem = claim_output(output, args, settings, lock) if accelerator.is_main_process else ""
        try:
            batches, expected, stream_skipped = make_batches(args, processor, accelerator, model.config.num_mel_bins)
        except StreamError as error:
            problem = problem or str(error)
        problem = next((p for p in gather(accelerator, problem) if p), "")  # every rank stops if one must
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        try:
            return caption(model, processor, batches, expected, stream_skipped, output, settings, args, accelerator,
                           dtype)
        except StreamError as error:  # too many damaged samples, as in training
            print(f"error: {error}", file=sys.stderr)
            return 1
        except MelMismatch as error:  # shards without an index: known at their first batch
            print(f"error: {error}", file=sys.stderr)
            return 2


class UnknownSource(ValueError):
    """``--source`` names a source the model recorded no prefix for."""


class MelMismatch(ValueError):
    """The clips' features have another number of mel bins than the model reads."""


class PromptError(ValueError):
    """A prompt the decoder cannot caption after, or a generation config ``--decoder`` cannot follow."""


def check_prompt(model, processor, args, option: str) -> None:
    """``PromptError`` (one line) if the prompt with the caption prefix (named by ``option``) leaves the
    decoder no position for a caption, or if the generation config asks ``--decoder static`` for
    something it does not implement."""
    prefix = prompt_ids(processor.tokenizer, args.prefix)
    prompt = decode.task_prompt(model.generation_config, LANGUAGE, TASK, prefix)
    if decode.prompt_room(model, prompt) < 1:
        positions, task = model.config.max_target_positions, len(prompt) - len(prefix)
        raise PromptError(f"{option}: the caption prefix takes {len(prefix)} tokens; with the {task} task tokens "
                         f"that leaves no room for a caption in the decoder's {positions} positions (at most "
                         f"{positions - task - 1} prefix tokens)")
    if args.decoder == "static":
        try:
            decode.check_supported(model.generation_config)
        except ValueError as error:
            raise PromptError(str(error)) from None


def caption_prefix(args, recorded: list[tuple[str, str]]) -> str:
    """The prefix to force: ``--prefix``, the one recorded for ``--source``, or the first recorded
    (the highest-weight source's); ``UnknownSource`` for a ``--source`` the model has no prefix for."""
    if args.prefix is not None:
        return args.prefix
    if args.source is not None:
        found = dict(recorded).get(args.source)
        if found is None:
            raise UnknownSource(f"--source {args.source}: no prefix recorded for it with {args.model_name} (recorded: "
                             f"{', '.join(name for name, _ in recorded) or 'none'}); pass --prefix TEXT instead")
        return found
    return recorded[0][1] if recorded else ""


def audio_window(model, args) -> AudioWindow:
    """``--audio-window`` (a fit window in the recorded steps), else the window recorded with the model."""
    try:
        recorded = recorded_window(model)
    except ValueError as error:
        raise ConfigError(f"{args.model_name}: generation_config.json {error}") from None
    return AudioWindow.parse(args.audio_window, recorded.step_seconds) if args.audio_window else recorded


def default_caption_length(model, model_name: str) -> tuple[int, str]:
    """``(tokens, where from)`` when ``--max-new-tokens`` is not given: the longest caption ``model``
    was trained on, end token included (recorded by training), else ``CAPTION_LENGTH_KEY`` of the
    ``config.yaml`` beside it, else that key's default (``pipeline.runs.caption_length``).

    The recorded length is not capped by ``CAPTION_LENGTH_KEY``: that setting is how long training's
    own evaluation lets captions run, fixed before any data was seen, and the saved ``config.yaml``
    holds it whether the user chose it or not (the default 64 looks the same as a 64 chosen); a cap
    would cut a trained model's captions wherever the data's are longer than the setting, and a
    model still learning to stop is already held to the data's longest caption. The cap a user means
    for inference is ``--max-new-tokens``."""
    recorded = recorded_caption_tokens(model)
    if recorded is not None:
        return recorded, f"the longest training caption, recorded with {model_name}"
    return caption_length(model_name)


def model_dtype(args, device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU unless ``--fp32``, and wherever ``--bf16`` asks; float32 otherwise."""
    return torch.bfloat16 if args.bf16 or (device.type == "cuda" and not args.fp32) else torch.float32


def claim_output(output: Path, args, settings: RunSettings, lock: contextlib.ExitStack) -> str:
    """Check ``output`` (and ``--metrics-out``) can be written and lock it for this run (held until
    ``lock`` closes); for ``--resume``, that its rows were made with ``settings``. The problem as one
    line, or ""."""
    problem = not_replaceable("--metrics-out", [args.metrics_out] if args.metrics_out else [])
    if problem or args.output == STDOUT:
        return problem
    problem = not_replaceable("--output", [output, f"{output}.lock", settings_file(output), *part_files(output)])
    if problem:
        return f"{problem}, or '{STDOUT}' for standard output"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        lock.enter_context(hold_lock(f"{output}.lock"))
    except LockBusy:
        return f"--output {output} is being written by another infer_stream.py run; wait for it or pick another file"
    except OSError as error:
        return f"cannot write --output {output}: {error.strerror or error}"
    if output.exists() and not os.access(output, os.W_OK):
        return f"cannot write --output {output}: permission denied"
    return resume_problem(output, settings) if args.resume else ""


def not_replaceable(option: str, paths: list) -> str:
    """The first of ``paths`` that is there but not a regular file, as one line naming ``option``; or ""."""
    for path in paths:
        try:
            check_replaceable(path)
        except NotRegularFile as error:
            return f"{option}: {error}; name a new path or a regular file"
    return ""


def caption(model, processor, batches, expected: int, stream_skipped, output: Path, settings: RunSettings, args,
            accelerator, dtype) -> int:
    """Caption every clip of ``batches`` into ``output`` (or standard output); print the summary and
    scores (on standard error when the rows go to standard output)."""
    info = sys.stderr if args.output == STDOUT else sys.stdout
    done = prepare_output(output, settings, args, accelerator)
    if accelerator.is_main_process:
        print(f"captioning on {accelerator.num_processes} process(es), device {accelerator.device}, "
              f"{settings.dtype}, decoder {args.decoder}, "
              f"{'greedy' if args.num_beams == 1 else f'{args.num_beams} beams'}, at most {args.max_new_tokens} "
              f"tokens per caption ({args.caption_length_from}), audio window {args.window}"
              + (f"; caption prefix {args.prefix!r}" if args.prefix.strip() else "")
              + (f"; {len(done)} keys already done" if args.resume else ""), file=info, flush=True)

    start = time.perf_counter()
    timer = StageTimer(model, accelerator.device)
    with (contextlib.nullcontext(io.StringIO()) if args.output == STDOUT
          else open_part(output, accelerator.process_index)) as out:
        done_now = run_generation(model, processor, batches, done, out, args, accelerator, expected, dtype, timer)
        texts = gather(accelerator, out.getvalue() if args.output == STDOUT else "")
    generated = sum(gather(accelerator, done_now.clips))
    skipped = sum(gather(accelerator, done_now.errors + stream_skipped()))
    cut = sum(gather(accelerator, done_now.cut))
    elapsed = time.perf_counter() - start
    timer.close()
    if accelerator.is_main_process:
        if args.output == STDOUT:
            rows = sorted((json.loads(line) for text in texts for line in text.splitlines()), key=lambda r: r["key"])
            sys.stdout.write(rows_text(rows))
            sys.stdout.flush()
        else:
            rows = merge_outputs(output, settings, args.resume)
        if skipped:
            print(f"{skipped} inputs skipped (errors reported above)", file=sys.stderr)
        if cut:
            print(f"{cut} clips longer than the {args.window} audio window were cut to it", file=sys.stderr)
        if args.print:
            print(rows, file=info)
        report_scores(rows, args, info)
        print(f"{generated} clips in {elapsed:.1f} s ({generated / max(elapsed, 1e-9):.1f} clips/s)", file=info,
              flush=True)
        print(timer.summary(elapsed), file=info, flush=True)
        print(f"predictions: {'standard output' if args.output == STDOUT else output.resolve()} ({len(rows)} rows)"
              + (f"; metrics: {Path(args.metrics_out).resolve()}" if args.metrics_out else ""), file=info, flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def gather(accelerator, value) -> list:
    """``value`` (any picklable object) from every rank (a collective: every rank must call it)."""
    from accelerate.utils import gather_object

    return gather_object([value]) if accelerator.num_processes > 1 else [value]


# ----------------------------------------------------------------------------------------------
# Inputs: shards or audio files, both as batches {"input_features", "keys", "captions", "is_pad"}


def make_batches(args, processor, accelerator, n_mels: int):
    """``(batches, clips this rank expects, stream_skipped() -> int)`` for ``--shards`` or ``--audio``;
    ``StreamError`` for shards whose index records other than the model's ``n_mels`` mel bins."""
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    pin = device.type == "cuda"
    if args.shards:
        settings = DataSettings(batch_size=args.batch_size, train=False, num_workers=args.num_dataloader_workers,
                                pin_memory=pin, bucket_pool_batches=args.bucket_pool_batches)
        loader = make_loader(args.shards, processor.tokenizer, settings, rank=rank, world_size=world, device=device)
        if loader.dataset.n_mels not in (None, n_mels):
            raise StreamError(mel_mismatch(loader.dataset.n_mels, n_mels, args))
        return loader, loader.dataset.rank_samples, lambda: loader.skipped
    files = find_audio(args.audio)
    if args.bucket_pool_batches:  # clips of like lengths batched together: rows are keyed, not ordered
        files.sort(key=header_seconds)
    files = files[rank::world]  # no collectives per batch, so ranks need not be even
    loader = DataLoader(AudioFiles(files, processor.feature_extractor.feature_size), batch_size=args.batch_size,
                        num_workers=args.num_dataloader_workers, collate_fn=collate_audio, pin_memory=pin)
    batches = in_background(loader) if args.num_dataloader_workers > 0 else loader
    return to_device_ahead(batches, device), len(files), lambda: 0  # bad files come back in batch["errors"]


def mel_mismatch(found: int, n_mels: int, args) -> str:
    return (f"--shards {args.shards}: the features have {found} mel bins, model {args.model_name} reads "
            f"{n_mels} (num_mel_bins); pack the audio with --n-mels {n_mels} or use a model made for {found}")


def header_seconds(path: str) -> float:
    """A file's duration as its header tells it (cheap; MP3's is an estimate), 0 where soundfile
    cannot read the header: only an ordering key, so such a file is decoded (or reported) as any other."""
    try:
        return soundfile.info(path).duration
    except (soundfile.LibsndfileError, RuntimeError, OSError):
        return 0.0


def find_audio(inputs: list[str]) -> list[str]:
    """Every file named and every audio file under every folder named (sorted; links to folders are
    followed), each file once: a file reached again by another path (``a/x.wav``, ``$PWD/a/x.wav``, a
    link to it) is dropped and counted on stderr, and a folder reached again (a link loop, a link to a
    folder already searched) is searched once. A path as first found (e.g. ``my_sounds/dogs/a.wav``)
    is also its clip's key."""
    paths, searched = [], set()
    for item in inputs:
        if os.path.isdir(item):
            found, repeats = audio_under(item, searched)
            if not found and not repeats:
                print(f"warning: no audio files ({' '.join(AUDIO_SUFFIXES)}) under {item}", file=sys.stderr)
            paths += sorted(found)
        else:
            paths.append(item)  # named explicitly: tried whatever its suffix; a missing file is reported
    unique, seen = [], set()
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(os.path.normpath(path))
    if len(unique) < len(paths):
        print(f"{len(paths) - len(unique)} duplicate input(s) dropped: the same file named again by another path "
              f"or link", file=sys.stderr)
    if not unique:
        raise SystemExit(f"error: no audio files found in {inputs}")
    return unique


def audio_under(folder: str, searched: set[str]) -> tuple[list[str], int]:
    """``(the audio files under folder, folders not searched again)``: links to folders followed,
    each folder (by resolved path) searched once over the calls that share ``searched``, each one
    reached again reported; so is a folder that cannot be read."""
    found, repeats = [], 0
    for path, folders, files in os.walk(folder, followlinks=True,
                                        onerror=lambda error: print(f"warning: cannot read folder {error.filename} "
                                                                    f"({error.strerror}): skipped", file=sys.stderr)):
        real = os.path.realpath(path)
        if real in searched:
            print(f"note: {path} is {real}, already searched", file=sys.stderr)
            repeats += 1
            folders.clear()
            continue
        searched.add(real)
        found += [os.path.join(path, name) for name in files if Path(name).suffix.lower() in AUDIO_SUFFIXES]
    return found, repeats


class AudioFiles(Dataset):
    """Decode + Whisper log-mel per file (``shard_tools.features``, as the packer); runs in workers.
    A file that cannot be decoded yields ``{"__key__", "error"}`` instead of features."""

    def __init__(self, files: list[str], n_mels: int):
        self.files, self.n_mels = files, n_mels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        try:
            decoded = decode_audio(path, max_seconds=CHUNK_LENGTH)
            clip = clip_features(decoded.audio, self.n_mels, decoded.seconds)
        except (AudioDecodeError, OSError) as error:
            return {"__key__": path, "error": f"{path}: {error}"}
        return {"__key__": path, "mel": clip["mel"], "pad_value": clip["pad_value"]}  # as a shard sample


def collate_audio(samples: list[dict]) -> dict:
    """A compact batch of the decoded clips (``Collator.compact``'s features and ``pad_values``);
    the failures are passed on as ``errors`` (messages naming the file)."""
    good = [s for s in samples if "error" not in s]
    width = max((s["mel"].shape[1] for s in good), default=0)
    features = np.stack([pad_mel(s["mel"], s["pad_value"], width) for s in good]) if good else np.empty((0, 0, 0))
    return {"input_features": torch.from_numpy(features.astype(np.float16, copy=False)),  # [B, n_mels, max_frames]
            "pad_values": torch.tensor([s["pad_value"] for s in good], dtype=torch.float32),  # [B]
            "keys": [s["__key__"] for s in good], "captions": [[] for _ in good],
            "is_pad": torch.zeros(len(good), dtype=torch.bool), "errors": [s["error"] for s in samples if "error" in s],
            "frames": torch.tensor([s["mel"].shape[1] for s in good], dtype=torch.int64)}  # [B]


# ----------------------------------------------------------------------------------------------
# Generation


class StageTimer:
    """Where captioning time goes, on this process: the encoder (hooks around its forward), the
    decoding (the rest of ``generate_captions``) and everything else (loading, featurising, padding,
    writing rows). On a GPU the hooks and ``generating`` synchronise, so that queued work is counted
    where it runs (a few syncs per batch)."""

    def __init__(self, model, device: torch.device):
        self.cuda = device.type == "cuda"
        self.encoder = self.generate = 0.0
        self._start = 0.0
        encoder = model.model.encoder
        self._hooks = [encoder.register_forward_pre_hook(lambda *_: self._mark()),
                       encoder.register_forward_hook(lambda *_: self._add_encoder())]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _mark(self) -> None:
        self._start = self._now()

    def _add_encoder(self) -> None:
        self.encoder += self._now() - self._start

    @contextlib.contextmanager
    def generating(self):
        start = self._now()
        yield
        self.generate += self._now() - start

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def summary(self, elapsed: float) -> str:
        def share(seconds: float) -> str:
            return f"{100 * seconds / max(elapsed, 1e-9):.0f}%"

        return (f"time: encoder {share(self.encoder)}, decoder {share(self.generate - self.encoder)}, "
                f"data and output {share(elapsed - self.generate)} (this process)")


@dataclasses.dataclass(frozen=True)
class Generated:
    """What one rank's ``run_generation`` did."""

    clips: int  # captioned
    errors: int  # inputs reported as errors
    cut: int  # clips longer than a fixed audio window, cut to it


def run_generation(model, processor, batches, done: set, out, args, accelerator, expected: int, dtype,
                   timer: StageTimer) -> Generated:
    """Caption every real, not-yet-done clip; write its row to ``out`` (this rank's part file)."""
    count = errors = cut = 0
    prefix = prompt_ids(processor.tokenizer, args.prefix)
    n_mels = model.config.num_mel_bins
    bar = tqdm(total=expected, unit="clip", desc="captioning", disable=not accelerator.is_local_main_process)
    with torch.inference_mode():
        for batch in batches:
            for error in batch.get("errors", ()):
                print(f"skipped {error}", file=sys.stderr, flush=True)
            errors += len(batch.get("errors", ()))
            real = [i for i, pad in enumerate(batch["is_pad"].tolist()) if not pad]
            keep = [i for i in real if batch["keys"][i] not in done]
            bar.update(len(real) - len(keep) + len(batch.get("errors", ())))  # the rest once captioned
            if not keep:
                continue
            if batch["input_features"].shape[1] != n_mels:
                raise MelMismatch(mel_mismatch(batch["input_features"].shape[1], n_mels, args))
            window = args.window.frames(batch["input_features"].shape[-1])
            cut += sum(bool(loses_audio(int(batch["frames"][i]), window)) for i in keep)
            features = expand_features(batch, window, device=accelerator.device, dtype=dtype)  # [B, n_mels, window]
            if len(keep) < len(batch["keys"]):  # clips done before a --resume, rank padding
                features = features[keep]  # [b, n_mels, window]
            with timer.generating():
                tokens = generate_captions(model, features, args.num_beams, args.max_new_tokens,
                                           prefix_ids=prefix, method=args.decoder)  # [b, T]
            captions = processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            for i, caption in zip(keep, captions):
                refs = list(batch["captions"][i])
                out.write(json.dumps({"key": batch["keys"][i], "pred_caption": caption.strip(),
                                      "gt_caption": refs[0] if refs else None, "gt_captions": refs}) + "\n")
            out.flush()  # a killed run keeps every finished batch for --resume
            count += len(keep)
            bar.update(len(keep))
    bar.close()
    return Generated(count, errors, cut)


# ----------------------------------------------------------------------------------------------
# Output: per-rank part files, merged by the main process


def prepare_output(output: Path, settings: RunSettings, args, accelerator) -> set[str]:
    """Keys already captioned (``--resume``: in the output, if its rows were made with ``settings``,
    and in part files a killed run left); without ``--resume`` stale part files are removed so they
    cannot leak into the new output, and ``settings`` are recorded for a later ``--resume``."""
    if args.output == STDOUT:
        return set()
    if accelerator.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            for path in part_files(output):
                print(f"removing {path} left by an earlier run (pass --resume to keep its rows)", file=sys.stderr)
                os.remove(path)
        if not args.resume or read_record(output) is None:
            write_record(output, settings, output_rows=not output.exists())  # an existing output: an earlier run's
        elif output.exists() and not resumable_rows(output):
            print(f"note: the rows in {output} are from before an interrupted run without --resume: they will be "
                  f"replaced", file=sys.stderr)
    accelerator.wait_for_everyone()
    done = set()
    if args.resume:
        for path in ([str(output)] if resumable_rows(output) else []) + part_files(output):
            done.update(row["key"] for row in read_rows(path))
    accelerator.wait_for_everyone()  # nobody appends to a part file before every rank has read them
    return done


# ----------------------------------------------------------------------------------------------
# Scores


def report_scores(rows: list[dict], args, info=sys.stdout) -> None:
    """Print to ``info`` (and with ``--metrics-out`` save) the metrics of every row that has references."""
    scored = [row for row in rows if row.get("gt_captions")]
    if scored:
        result = metrics.score([row["pred_caption"] for row in scored], [row["gt_captions"] for row in scored],
                               metrics=args.metrics)
        print(metrics.format_table(result), file=info, flush=True)
    else:
        result = metrics.not_scored(0, "no reference captions in the input")
        print("no reference captions: nothing to score", file=info, flush=True)
    if args.metrics_out:
        path = Path(args.metrics_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main(args=CLI_ARGS))
