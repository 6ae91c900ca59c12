"""Pack an audio-captioning dataset into WebDataset shards of Whisper log-mel features.

    python -m shard_tools.pack DATASET [--out data] [--workers N] [--n-mels 80|128] ...
    python -m shard_tools.pack --manifest captions.csv --audio-field audio_file --caption-field caption_text
    python -m shard_tools.pack --from-shards 'raw/{000..009}.tar' --audio-field flac --caption-field json.text
    python -m shard_tools.pack --hf-dataset NAME_OR_DIR --caption-field caption

The input layout's reader (``layouts``) lists each split's inputs in a fixed order, a worker pool
computes the features, and this process writes the shards in input order, so they are byte-identical
for any ``--workers``; ``--resume`` and ``--part`` build on that. Nothing here imports torch.
Options, resume, parts, exit status: docs/packing.md ("How it runs", "Resume").
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from shard_tools import shard_format
from shard_tools.fileio import LockBusy, hold_lock, write_atomic, write_json
from shard_tools.shard_format import INDEX_FILE, REJECTS_FILE, Reject, SampleMeta
from shard_tools import sources, writer
from shard_tools.layouts import LAYOUTS, Layout

SHARD_FILE = re.compile(r"^\d{3,}\.tar$")
LOCK_FILE = ".lock"
# Temporaries this packer writes: ``000.tar.tmp`` (writer) and ``.index.json.XXXX.tmp`` (fileio).
OWN_TEMP_FILE = re.compile(r"^(\d{3,}\.tar|\.(index\.json|rejects\.jsonl)\..+)\.tmp$")
MB = 1_000_000
# Imported once by the forkserver, so that each forked worker starts with them loaded (a failed
# import there only costs start-up time). Not this module: under ``python -m shard_tools.pack`` each
# worker re-runs it as its main module, which runpy warns about when it is already imported.
WORKER_PRELOAD = ["shard_tools.features"]


class PackError(Exception):
    """A usage problem reported as one line (exit status 2)."""


@dataclass(frozen=True)
class PackSettings:
    """One packing run, built once from the command line (``settings_from_args``)."""

    layout: Layout
    input: sources.InputSpec  # what the layout's reader reads, this run's part included
    out: Path
    n_mels: int
    samples_per_shard: int  # 0: no limit (then max_shard_mb is set)
    max_shard_mb: float | None
    max_reject_fraction: float
    workers: int
    resume: bool
    overwrite: bool

    def resume_record(self, split: str) -> dict:
        """What determines the bytes of ``split`` besides its inputs' contents, recorded with its
        shards (``.progress.jsonl``) and checked by ``--resume``: a resumed run must match it exactly,
        so its keys and values stay those that earlier outputs hold."""
        spec = self.input
        return {"layout": self.layout.name,
                "input": os.path.abspath(spec.location) if self.layout.local else spec.location,
                "audio_field": spec.audio_field, "caption_fields": list(spec.caption_fields), "split": split,
                "n_mels": self.n_mels, "samples_per_shard": self.samples_per_shard,
                "max_shard_mb": self.max_shard_mb, "part": spec.part, "num_parts": spec.num_parts,
                "format_version": shard_format.FORMAT_VERSION}


# ----------------------------------------------------------------------------- worker side

# The features (numpy, scipy, soundfile, soxr; never torch) are imported by the workers only
# (init_worker first): with --workers > 1 the main process lists inputs and writes tars.

_START_ERROR: str | None = None  # why this worker process could not start, raised by its tasks


def init_worker(n_mels: int) -> None:
    """Once per worker: the features module loaded and the mel filters built up front. A failure is
    kept for the worker's tasks to raise: ``Pool`` replaces a worker whose initializer raises, without
    end, so raising here would hang the packer instead of stopping it."""
    global _START_ERROR
    _START_ERROR = None
    try:
        from shard_tools.features import mel_filters

        mel_filters(n_mels)
    except Exception as error:  # noqa: BLE001 - any failure: reported by every task of this worker
        _START_ERROR = f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Encoded:
    """One clip as the workers send it back: the shard members' bytes and what the index counts."""

    key: str
    members: list[tuple[str, bytes]]
    seconds: float
    truncated: bool


def encode(item: sources.Item | Reject, n_mels: int) -> Encoded | Reject:
    """An Item's shard members, or a reject (passed through, or made here for audio that does not
    decode, is empty, silent or overflows, and for a sample the shard format refuses)."""
    from shard_tools.features import AudioDecodeError, clip_features, decode_audio  # loaded by init_worker

    if isinstance(item, Reject):
        return item
    try:  # only the 30-s window is decoded: a 2-hour file costs what 30 s cost
        decoded = decode_audio(item.audio, max_seconds=shard_format.CHUNK_LENGTH)
        feats = clip_features(decoded.audio, n_mels, decoded.seconds)  # mel [n_mels, valid_frames] float16
        meta = SampleMeta(item.captions, item.source, feats["seconds"], decoded.orig_sample_rate,
                          feats["pad_value"], feats["truncated"], item.extra)
        members = shard_format.encode_sample(item.key, feats["mel"], meta)
    except (AudioDecodeError, shard_format.SampleError, OSError) as error:
        return Reject(item.source, item.split, str(error))
    return Encoded(item.key, members, feats["seconds"], feats["truncated"])


def encode_chunk(items: list, n_mels: int) -> list[Encoded | Reject]:
    if _START_ERROR:
        raise PackError(f"a packing worker could not start ({_START_ERROR}); try --workers 1 to see it in "
                        f"this process")
    return [encode(item, n_mels) for item in items]


def chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@contextlib.contextmanager
def worker_pool(workers: int, n_mels: int):
    """A pool of ``workers`` processes, or None to compute in this process (``workers <= 1``)."""
    if workers <= 1:
        init_worker(n_mels)
        if _START_ERROR:
            raise PackError(f"cannot compute features: {_START_ERROR}")
        yield None
        return
    context = multiprocessing.get_context("forkserver")  # never fork a caller's threads (torch, BLAS)
    context.set_forkserver_preload(WORKER_PRELOAD)
    # One thread per worker for the libraries that read this when they load (the forkserver and its
    # workers inherit this environment): numpy's BLAS starts a pool per process whose idle threads spin,
    # which gains nothing within one worker but oversubscribes the cores once several run.
    omp_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with context.Pool(workers, initializer=init_worker, initargs=(n_mels,)) as pool:
            yield pool
    finally:
        if omp_before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = omp_before


def encoded(items: Iterable, pool, workers: int, n_mels: int, chunksize: int) -> Iterator[Encoded | Reject]:
    """``encode`` over ``items``, results in input order, at most 4 chunks per worker in flight."""
    if pool is None:
        yield from (encode(item, n_mels) for item in items)
        return
    work = functools.partial(encode_chunk, n_mels=n_mels)
    in_flight = 4 * workers
    pending = collections.deque()
    for chunk in chunks(items, chunksize):
        pending.append(pool.apply_async(work, (chunk,)))
        if len(pending) >= in_flight:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


def chunk_size(total: int | None, workers: int) -> int:
    """Inputs per task: enough to make the per-task overhead small, few enough to balance workers."""
    if total is None:
        return 8
    return max(1, min(16, total // (4 * max(1, workers))))


# ----------------------------------------------------------------------------- one split

@dataclass
class SplitResult:
    directory: Path
    samples: int
    seconds: float
    shards: int
    bytes: int
    truncated: int
    rejected: int
    packed_now: int  # clips encoded in this run (not kept from an earlier one)
    repeats: int  # second paths to inputs already read (not inputs)


def split_directory(out: Path, split: str, part: int, num_parts: int) -> Path:
    directory = out / split if split else out
    return directory / f"part-{part}-of-{num_parts}" if num_parts > 1 else directory


def prepare_directory(directory: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into an earlier one's output unless told to resume or overwrite."""
    existing = [p for p in directory.iterdir() if SHARD_FILE.match(p.name)
                or p.name in (INDEX_FILE, writer.PROGRESS_FILE)] if directory.is_dir() else []
    if existing and not resume and not overwrite:
        raise PackError(f"{directory} already holds shards from an earlier run: pass --resume to continue "
                        "it or --overwrite to replace it")
    if overwrite:
        for path in existing:
            path.unlink()
    if directory.is_dir():
        for path in directory.iterdir():  # debris of a killed run: only our own temporaries
            if OWN_TEMP_FILE.match(path.name):
                path.unlink()


def digest_range(digests: Iterable[str]) -> str:
    """One digest for the inputs of a shard (or of the tail after the last shard)."""
    return hashlib.sha256("".join(digests).encode("ascii")).hexdigest()


def check_resumable(directory: Path, record: dict) -> dict | None:
    """An earlier run's progress in ``directory`` (None without one); PackError when it was packed
    with other settings (``record``: ``PackSettings.resume_record``), so that a mistyped option is
    refused instead of repacking (and removing) every shard."""
    progress = writer.read_progress(directory)
    if progress is not None and progress["settings"] != record:
        earlier = progress["settings"] or {}
        changed = sorted(k for k in record.keys() | earlier.keys() if record.get(k) != earlier.get(k))
        raise PackError(f"cannot resume {directory}: it was packed with other settings "
                        f"({', '.join(changed)} differ); pass --overwrite to pack it again")
    return progress


def resume_state(directory: Path, record: dict, split_input: sources.SplitInput
                 ) -> tuple[list[dict], list[Reject], bool]:
    """``(kept shard entries, their rejects, complete)`` from an earlier run's progress file: the
    leading shards whose bytes are intact and whose inputs are unchanged (docs/packing.md, 'Resume')."""
    progress = check_resumable(directory, record)
    if progress is None:
        return [], [], False
    intact = writer.intact_prefix(directory, progress["shards"])
    digests = (sources.item_digest(item) for item in split_input.items())
    kept, first = [], 0
    for shard in intact:
        if shard.get("inputs") != digest_range(itertools.islice(digests, shard["next_input"] - first)):
            break
        kept.append(shard)
        first = shard["next_input"]
    if len(kept) == len(progress["shards"]) and progress["complete"]:
        tail = list(digests)
        if progress["tail"] == {"count": first + len(tail), "digest": digest_range(tail)}:
            return kept, progress["rejects"], True
    return kept, [r for r in progress["rejects"] if r.input < first], False


def pack_split(split_input: sources.SplitInput, directory: Path, settings: PackSettings, pool) -> SplitResult:
    """Pack one split (of one part) into ``directory``, holding its lock; returns its totals."""
    directory.mkdir(parents=True, exist_ok=True)  # even a split of rejects only gets its index
    try:
        with hold_lock(directory / LOCK_FILE):
            return _pack_split(split_input, directory, settings, pool)
    except LockBusy as error:
        raise PackError(f"{directory} is being written by another packer ({error}); wait for it to finish") \
            from None


def _pack_split(split_input: sources.SplitInput, directory: Path, settings: PackSettings, pool) -> SplitResult:
    prepare_directory(directory, settings.resume, settings.overwrite)
    record = settings.resume_record(split_input.name)
    shards, rejects, complete = (resume_state(directory, record, split_input) if settings.resume
                                 else ([], [], False))
    packed_now = 0
    if not complete:
        (directory / INDEX_FILE).unlink(missing_ok=True)  # the split is incomplete until the end
        log = writer.ProgressLog(directory, record, shards, rejects)
        packed_now = write_shards(split_input, directory, settings, pool, log, shards, rejects)
    remove_stale_shards(directory, {s["name"] for s in shards})
    truncated = sum(s["truncated"] for s in shards)
    writer.write_rejects(directory / REJECTS_FILE, rejects)
    write_json(directory / INDEX_FILE, shard_format.Index(
        split_input.name, settings.n_mels, [writer.index_entry(s) for s in shards], truncated, len(rejects)).to_dict())
    return SplitResult(directory, sum(s["samples"] for s in shards), sum(s["seconds"] for s in shards), len(shards),
                       sum(s["bytes"] for s in shards), truncated, len(rejects), packed_now,
                       len(split_input.repeats))


def write_shards(split_input: sources.SplitInput, directory: Path, settings: PackSettings, pool,
                 log: writer.ProgressLog, shards: list[dict], rejects: list[Reject]) -> int:
    """Encode the inputs after the kept shards and write the rest; ``shards`` and ``rejects`` grow
    in place and go to the progress log after every shard, each shard with the digest of its
    inputs. Returns the clips encoded."""
    start = shards[-1]["next_input"] if shards else 0
    logged = len(rejects)  # rejects already in the log
    digests: dict[int, str] = {}  # position -> input digest, until its shard is complete
    first = start  # first input of the shard being filled

    def digest_until(end: int) -> str:
        nonlocal first
        digest = digest_range(digests.pop(i) for i in range(first, end))
        first = end
        return digest

    def on_shard(entry: dict) -> None:
        nonlocal logged
        entry["inputs"] = digest_until(entry["next_input"])
        shards.append(entry)
        log.add_shard(entry, rejects[logged:])
        logged = len(rejects)

    def listed(items):
        for position, item in enumerate(items, start):
            digests[position] = sources.item_digest(item)
            yield item

    shard_writer = writer.ShardWriter(directory, settings.samples_per_shard or None,
                                      int(settings.max_shard_mb * MB) if settings.max_shard_mb else None,
                                      first_shard=len(shards), on_shard=on_shard)
    items = listed(itertools.islice(split_input.items(), start, None))
    results = encoded(items, pool, settings.workers, settings.n_mels, chunk_size(split_input.total, settings.workers))
    bar = tqdm(total=split_input.total, initial=start, unit="clip", desc=split_input.name or "pack",
               dynamic_ncols=True, mininterval=0.5)
    consumed, packed = start, 0
    try:
        for position, result in enumerate(results, start):
            if isinstance(result, Reject):
                rejects.append(dataclasses.replace(result, input=position))
            else:
                shard_writer.add(result.key, result.members, result.seconds, result.truncated, position)
                packed += 1
            consumed = position + 1
            bar.update()
        shard_writer.close(next_input=consumed)
        log.finish(rejects[logged:], {"count": consumed, "digest": digest_until(consumed)})
    except BaseException:
        shard_writer.abort()
        raise
    finally:
        bar.close()
    return packed


def remove_stale_shards(directory: Path, names: set[str]) -> None:
    """Shards an earlier run left beyond this run's last one would be read by brace patterns."""
    for path in directory.iterdir():
        if SHARD_FILE.match(path.name) and path.name not in names:
            path.unlink()


def merge_parts(split_dir: Path, split: str, num_parts: int, n_mels: int) -> Path | None:
    """When all ``num_parts`` part indexes exist, write ``split_dir/index.json`` over all their
    shards (names ``part-I-of-N/000.tar``) and the combined ``rejects.jsonl``; None otherwise."""
    parts = [split_dir / f"part-{i}-of-{num_parts}" for i in range(num_parts)]
    if not all((part / INDEX_FILE).is_file() for part in parts):
        return None
    entries, truncated, rejected, reject_lines = [], 0, 0, []
    for part in parts:
        index = shard_format.parse_index((part / INDEX_FILE).read_bytes(), str(part / INDEX_FILE))
        entries += [dataclasses.replace(e, name=f"{part.name}/{e.name}") for e in index.entries]
        truncated += index.truncated
        rejected += index.rejected
        reject_lines.append((part / REJECTS_FILE).read_bytes())
    write_atomic(split_dir / REJECTS_FILE, b"".join(reject_lines))
    write_json(split_dir / INDEX_FILE, shard_format.Index(split, n_mels, entries, truncated, rejected).to_dict())
    return split_dir / INDEX_FILE


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """The command line; its input options, their help and the field defaults come from ``LAYOUTS``."""
    parser = argparse.ArgumentParser(prog="python -m shard_tools.pack", description=__doc__.split("\n\n")[0])
    layouts = LAYOUTS.values()
    source = parser.add_argument_group(f"input (exactly one of {', '.join(l.named for l in layouts)})")
    for layout in layouts:
        if layout.option:
            source.add_argument(layout.option, dest=layout.name, metavar=layout.metavar, help=layout.help)
        else:
            source.add_argument(layout.name, nargs="?", metavar=layout.metavar, help=layout.help)
    audio = "; ".join(f"{l.named}: {l.audio_help}" + (f" (default: {l.audio_field})" if l.audio_field else "")
                      for l in layouts if l.audio_help)
    source.add_argument("--audio-field", metavar="FIELD", help=f"where the audio is, by input: {audio}")
    captions = "; ".join(f"{l.named}: {l.caption_field}" for l in layouts)
    source.add_argument("--caption-field", metavar="FIELDS", help="caption field: a dotted path (json.text), "
                        f"several joined by commas, a list field for several captions (defaults: {captions})")
    source.add_argument("--split", metavar="NAME", help="pack only this split (split folders, HF), or the "
                        "output split name of a single-split input (flat folder, manifest, shards)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default=Path("data"), type=Path, help="output folder (default: data)")
    out.add_argument("--n-mels", type=int, default=80, choices=(80, 128), help="mel bins: 80, or 128 for "
                     "large-v3 (default: 80)")
    out.add_argument("--samples-per-shard", metavar="N", type=int, default=1000,
                     help="samples per shard; 0: no limit, use --max-shard-mb (default: 1000)")
    out.add_argument("--max-shard-mb", metavar="MB", type=float, help="largest shard size in MB (10^6 bytes)")
    out.add_argument("--max-reject-fraction", metavar="F", type=float, default=0.1,
                     help="exit with status 1 when more than this fraction of the inputs is rejected (default: 0.1)")
    out.add_argument("--resume", action="store_true", help="keep the complete shards of an interrupted "
                     "run (checked by sha256) and pack the rest")
    out.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier run")
    run = parser.add_argument_group("parallelism")
    run.add_argument("--workers", metavar="N", type=int, default=default_workers(),
                     help="worker processes (default: all cores)")
    run.add_argument("--part", metavar="I", type=int, default=0, help="pack slice I of --num-parts (0-based)")
    run.add_argument("--num-parts", metavar="N", type=int, default=1,
                     help="number of disjoint slices, e.g. one per machine (default: 1)")
    return parser


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def validate(args) -> None:
    if not 0 <= args.part < args.num_parts:
        raise PackError(f"--part {args.part} must be in 0..{args.num_parts - 1} (--num-parts {args.num_parts})")
    if args.samples_per_shard < 0 or (args.max_shard_mb is not None and args.max_shard_mb <= 0):
        raise PackError("--samples-per-shard must be >= 0 and --max-shard-mb > 0")
    if not args.samples_per_shard and not args.max_shard_mb:
        raise PackError("--samples-per-shard 0 needs --max-shard-mb")
    if args.workers < 1:
        raise PackError("--workers must be at least 1")
    if args.resume and args.overwrite:
        raise PackError("--resume and --overwrite exclude each other")
    if args.out.exists() and not args.out.is_dir():
        raise PackError(f"--out {args.out} is a file, not a folder")


def settings_from_args(args) -> PackSettings:
    """The run's settings from the parsed command line, the layout's defaults filled in; PackError for
    a usage error."""
    validate(args)
    chosen = [layout for layout in LAYOUTS.values() if getattr(args, layout.name)]
    if len(chosen) != 1:
        named = [layout.named for layout in LAYOUTS.values()]
        raise PackError(f"give exactly one input: {', '.join(named[:-1])} or {named[-1]}")
    layout, location = chosen[0], getattr(args, chosen[0].name)
    try:
        captions = tuple(sources.parse_fields(args.caption_field or layout.caption_field))
    except ValueError as error:
        raise PackError(f"--caption-field: {error}") from error
    # a layout that finds the audio itself ignores --audio-field, so it is not recorded
    audio = (args.audio_field or layout.audio_field) if layout.audio_help else None
    spec = sources.InputSpec(location, captions, audio, args.part, args.num_parts, args.split,
                             output_inside(layout, location, args.out))
    return PackSettings(layout, spec, args.out, args.n_mels, args.samples_per_shard, args.max_shard_mb,
                        args.max_reject_fraction, args.workers, args.resume, args.overwrite)


def output_inside(layout: Layout, location: str, out: Path) -> str | None:
    """The resolved ``--out`` when it lies inside a folder input whose files are all inputs (it is
    never read as one), else None."""
    if not layout.lists_folder:
        return None
    root, out = os.path.realpath(location), os.path.realpath(out)
    return out if out != root and sources.inside(out, root) else None


def check_output_apart(settings: PackSettings, plan: Iterable[tuple[sources.SplitInput, Path]]) -> None:
    """Refuse an output folder among the inputs: a raw shard read from a folder the run writes (it
    would be overwritten or removed before it is read), or a folder inside a folder input that is not
    skipped as the ``--out`` folder (``--out`` the DATASET folder itself: read by the next run)."""
    multipart = settings.input.num_parts > 1
    for split_input, directory in plan:
        # a part also writes the merged index beside its part folders
        written = {os.path.realpath(d) for d in (directory, directory.parent if multipart else directory)}
        for shard in split_input.shard_files:
            # the link and its target: --overwrite removes a link to a shard as it would the shard
            if {os.path.realpath(os.path.dirname(os.path.abspath(shard))),
                    os.path.dirname(os.path.realpath(shard))} & written:
                raise PackError(f"--out {settings.out}: the input shard {shard} lies in {directory}, a folder "
                                "this run writes (its shards would be overwritten before they are read); "
                                "choose another --out")
    if not settings.layout.lists_folder or settings.input.skip:
        return
    root = os.path.realpath(settings.input.location)
    for _, directory in plan:
        if sources.inside(directory, root):
            raise PackError(f"--out {settings.out}: {directory} would be written among the inputs of the dataset "
                            f"folder {settings.input.location} and read by the next run; choose an --out that is "
                            "not the dataset folder (a folder of its own inside it is fine)")


def open_inputs(settings: PackSettings) -> list[sources.SplitInput]:
    """The split inputs of the run's part, listed by its layout's reader."""
    if settings.input.skip and os.path.isdir(settings.input.skip):
        print(f"note: {settings.out} is skipped when listing the inputs: it is the --out folder", file=sys.stderr)
    try:
        return settings.layout.read(settings.input)
    except (OSError, ValueError, ImportError) as error:  # a missing folder, manifest or 'datasets' package
        raise PackError(str(error)) from error


def summary_line(name: str, r: SplitResult, elapsed: float) -> str:
    kept = f" ({r.samples - r.packed_now} kept from an earlier run)" if r.packed_now != r.samples else ""
    return (f"{name}: {r.samples} clips{kept}, {r.seconds / 3600:.2f} h, {r.shards} shards, {r.bytes / MB:.1f} MB, "
            f"{r.packed_now / elapsed:.1f} clips/s, truncated {r.truncated}, rejected {r.rejected}, "
            f"repeats {r.repeats}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except PackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = []
    start = time.perf_counter()
    part, num_parts = settings.input.part, settings.input.num_parts
    try:
        with worker_pool(settings.workers, settings.n_mels) as pool:  # workers start while the inputs are listed
            split_inputs = open_inputs(settings)
            plan = [(split_input, split_directory(settings.out, split_input.name, part, num_parts))
                    for split_input in split_inputs]
            check_output_apart(settings, plan)
            for split_input in split_inputs:
                for repeat in split_input.repeats:
                    print(f"note: {repeat.source}: {repeat.note} (not a rejected input)", file=sys.stderr)
            if settings.resume:  # every split's settings checked before any split is touched
                for split_input, directory in plan:
                    check_resumable(directory, settings.resume_record(split_input.name))
            for split_input, directory in plan:
                t0 = time.perf_counter()
                if num_parts > 1:  # the merged index is stale while any part is being packed
                    (directory.parent / INDEX_FILE).unlink(missing_ok=True)
                result = pack_split(split_input, directory, settings, pool)
                results.append((result, time.perf_counter() - t0))
                if num_parts > 1 and merge_parts(directory.parent, split_input.name, num_parts, settings.n_mels):
                    print(f"all {num_parts} parts of {directory.parent} are complete: wrote its index.json")
    except PackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the output cannot be written: read-only, a file in the way, a full disk
        print(f"error: cannot write {error.filename or settings.out}: {error.strerror or error}", file=sys.stderr)
        return 2
    return report(results, time.perf_counter() - start, settings.max_reject_fraction)


def report(results: list, elapsed: float, max_reject_fraction: float) -> int:
    """Print the closing summary; 1 when too many inputs were rejected."""
    for result, seconds in results:
        print(summary_line(str(result.directory), result, seconds))
    total = SplitResult(Path(), *(sum(getattr(r, f) for r, _ in results)
                                  for f in ("samples", "seconds", "shards", "bytes", "truncated", "rejected",
                                            "packed_now", "repeats")))
    print(summary_line("total", total, elapsed))
    inputs = total.samples + total.rejected
    if inputs and total.rejected / inputs > max_reject_fraction:
        where = ", ".join(str(r.directory / REJECTS_FILE) for r, _ in results if r.rejected)
        print(f"error: {total.rejected} of {inputs} inputs ({total.rejected / inputs:.1%}) were rejected, more "
              f"than --max-reject-fraction {max_reject_fraction}; the reasons are in {where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from shard_tools import pack  # run the importable module: workers then unpickle pack.encode_chunk

    sys.exit(pack.main())
