"""Packer throughput and shard size, side by side with the seed's per-clip path, in one run.

    python bench/pack.py [--clips 240] [--min-seconds 1 --max-seconds 30] [--corpus DIR]
    python bench/pack.py --short [--clips 2000] [--workers 1] [--baseline 459be6b] [--repeats 3]

Rows (all over the same generated corpus: wav/flac/ogg/mp3, 16/22.05/44.1/48 kHz, mono and stereo):
- seed, extractor default: ``librosa.load`` + ``librosa.resample`` + ``WhisperFeatureExtractor``
  as the seed called it (transformers 5 runs a torch STFT on the 30-s padded clip), one process;
- seed, numpy extractor: the same with the extractor's numpy path (what older transformers ran);
- floor: decoding and resampling only (``shard_tools.features.decode_audio``), one process;
- ``python -m shard_tools.pack --workers 1`` and ``--workers N``: the packer end to end, as a user runs
  it, Python start-up and writing the shards included.
Then shard bytes per audio second against the same audio stored as 16-kHz mono FLAC.

``--short``: short clips (2-10 s by default, 2,000 distinct ones, no hard-linked copies), where the
packer's per-clip costs beyond decoding weigh most. Per repeat, in this order: the floor (decode and
resample every clip with ``decode_audio``, in this process after a warm-up; with ``--workers N``, in
a pool of N processes started beforehand), the packer of ``--baseline REV`` (``git archive``) end
to end, then this tree's packer end to end, each with ``--workers N``; the ratio to the floor of the
same repeat, wall clock and CPU seconds (the packer's from the reaped process tree, so for
``--workers 1`` only), and whether both packers wrote the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
from transformers import WhisperFeatureExtractor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seed import audio_files, seed_features  # noqa: E402
from shard_tools.features import decode_audio  # noqa: E402
from shard_tools.shard_format import REJECTS_FILE, SAMPLE_RATE  # noqa: E402
from shard_tools.synth import make_corpus  # noqa: E402

def replicate(corpus: Path, times: int) -> Path:
    """``times`` hard-linked copies of every clip and caption under new names: a corpus long enough
    to amortise start-up (Python, torch, the worker pool) without generating more audio."""
    out = corpus.parent / f"{corpus.name}_x{times}" / "train"
    if not out.is_dir():
        out.mkdir(parents=True)
        for path in sorted((corpus / "train").iterdir()):
            for r in range(times):
                os.link(path, out / f"{path.stem}_r{r}{path.suffix}")
    return out.parent


def time_per_clip(fn, files: list[str]) -> float:
    start = time.perf_counter()
    for path in files:
        fn(path)
    return time.perf_counter() - start


def _decode_all(files: list[str]) -> None:
    for path in files:
        decode_audio(path)


def floor_scaling(files: list[str], processes: int) -> float:
    """The floor's own speed-up with ``processes`` processes: what this machine's cores allow."""
    import multiprocessing

    start = time.perf_counter()
    _decode_all(files)
    one = time.perf_counter() - start
    os.environ["OMP_NUM_THREADS"] = "1"  # as the packer's workers run (see shard_tools/pack.py)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_decode_all, [[]] * processes)  # start-up (imports) out of the timing
        start = time.perf_counter()
        pool.map(_decode_all, [files[i::processes] for i in range(processes)])
        scaling = one / (time.perf_counter() - start)
    del os.environ["OMP_NUM_THREADS"]
    return scaling


def run_packer(corpus: Path, out: Path, workers: int, code: Path = ROOT) -> tuple[float, float, float]:
    """Wall seconds of the whole command (``code``'s packer), the clips/s it reports once running, and
    the CPU seconds of its reaped process tree."""
    cpu = children_cpu()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "shard_tools.pack", str(corpus), "--out", str(out),
                           "--workers", str(workers)], cwd=code, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    split_line = next(line for line in done.stdout.splitlines() if line.startswith(str(out)))
    return wall, float(re.search(r"([0-9.]+) clips/s", split_line).group(1)), children_cpu() - cpu


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# Run by ``python -c`` in a code folder (this tree or a baseline's), so its own decode_audio is timed.
FLOOR_SCRIPT = """
import json, sys, time
from shard_tools.features import decode_audio
files = json.load(sys.stdin)
decode_audio(files[0])  # imports and first-call set-up out of the timing
wall, cpu = time.perf_counter(), time.process_time()
for path in files:
    decode_audio(path)
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
"""


def floor_seconds(files: list[str], workers: int, code: Path) -> tuple[float, float]:
    """Wall and CPU seconds for ``code``'s ``decode_audio`` to decode and resample ``files``, split
    across ``workers`` processes (started, and their imports done, outside the timing; wall: the
    slowest, CPU: the sum)."""
    procs = [subprocess.Popen([sys.executable, "-c", FLOOR_SCRIPT], cwd=code, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    results = [json.loads(p.communicate(json.dumps(files[i::workers]))[0]) for i, p in enumerate(procs)]
    return max(r["wall"] for r in results), sum(r["cpu"] for r in results)


def same_bytes(a: Path, b: Path) -> bool:
    """Both packer outputs hold the same files with the same bytes."""
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != ".lock")
    return names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != ".lock") and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def compare_outputs(a: Path, b: Path) -> str:
    """"byte-identical", or how two packer outputs differ: the same members, metadata and rejects,
    and how many log-mel values (and pad values) differ by how much (float16 rounding of a different
    FFT), or what else."""
    if same_bytes(a, b):
        return "byte-identical"
    members = {}
    for out in (a, b):
        members[out] = {}
        for tar_path in sorted(out.rglob("*.tar")):
            with tarfile.open(tar_path) as tar:
                for info in tar:
                    members[out][f"{tar_path.relative_to(out)}/{info.name}"] = tar.extractfile(info).read()
    if members[a].keys() != members[b].keys():
        return "different samples"
    rejects = sorted(p.relative_to(a) for p in a.rglob(REJECTS_FILE))  # every split's
    if rejects != sorted(p.relative_to(b) for p in b.rglob(REJECTS_FILE)) or any(
            (a / r).read_bytes() != (b / r).read_bytes() for r in rejects):
        return "different rejects"
    differing = values = 0
    worst = worst_pad = 0.0
    for name, data in members[a].items():
        if not name.endswith(".npy"):
            x, y = json.loads(data), json.loads(members[b][name])
            worst_pad = max(worst_pad, abs(x.pop("pad_value") - y.pop("pad_value")))
            if x != y:
                return f"different metadata ({name})"
            continue
        x = np.load(io.BytesIO(data)).astype(np.float32)
        y = np.load(io.BytesIO(members[b][name])).astype(np.float32)
        if x.shape != y.shape:
            return f"different mel shapes ({name})"
        differing += int((x != y).sum())
        values += x.size
        worst = max(worst, float(np.abs(x - y).max()))
    return (f"same samples, metadata and rejects; log-mel values differ at {differing} of {values} "
            f"({100 * differing / values:.3f} %), by at most {worst:.2g}; pad values by at most {worst_pad:.2g}")


def short_clips(args) -> None:
    """The ``--short`` rows (module doc)."""
    from bench.baseline import checkout

    work = Path(tempfile.mkdtemp(prefix="bench_pack_short_"))
    corpus = args.corpus or work / "corpus"
    if not (corpus / "train").is_dir():
        make_corpus(corpus, train=args.clips, validation=0, min_seconds=args.min_seconds,
                    max_seconds=args.max_seconds)
    files = [str(p) for p in audio_files(corpus)]
    n = len(files)
    seconds = sum(soundfile.info(p).duration for p in files)
    codes = ([(args.baseline, checkout(args.baseline))] if args.baseline else []) + [("this tree", ROOT)]
    print(f"corpus: {n} clips, {seconds / n:.1f} s/clip on average; {os.cpu_count()} cores; "
          f"--workers {args.workers}; {args.repeats} repeats; load average {os.getloadavg()[0]:.1f}")
    rows = []
    for repeat in range(args.repeats):
        floors = {name: floor_seconds(files, args.workers, code) for name, code in codes}
        for name, code in codes:
            out = work / f"out_{repeat}_{len(rows)}"
            wall, _, cpu = run_packer(corpus, out, args.workers, code)
            rows.append({"repeat": repeat, "code": name, "out": out, "wall": wall, "cpu": cpu, "floors": floors})
    floor_of = "this tree"  # the strict floor: this tree's decode_audio
    print(f"\nfloor: decode + resample with {floor_of}'s decode_audio"
          + (f" ({args.baseline}'s in brackets)" if args.baseline else "") + "; packer: python -m shard_tools.pack "
          f"--workers {args.workers}, end to end (start-up and writing included); CPU: user + sys\n")
    print("| packer | repeat | floor s | packer s | packer / floor | extra ms per clip | floor CPU s | packer CPU s "
          "| CPU packer / floor |\n|---|---|---|---|---|---|---|---|---|")

    def cells(r: dict, floor: tuple[float, float]) -> list[str]:
        return [f"{floor[0]:.2f}", f"{r['wall'] / floor[0]:.2f}x", f"{1000 * (r['wall'] - floor[0]) / n:.2f}",
                f"{floor[1]:.2f}", f"{r['cpu'] / floor[1]:.2f}x"]

    for r in rows:
        mine = cells(r, r["floors"][floor_of])
        if args.baseline:
            mine = [f"{a} ({b})" for a, b in zip(mine, cells(r, r["floors"][args.baseline]))]
        print(f"| {r['code']} | {r['repeat']} | {mine[0]} | {r['wall']:.2f} | {mine[1]} | {mine[2]} | {mine[3]} | "
              f"{r['cpu']:.2f} | {mine[4]} |")
    print("\nover the repeats (median; best in brackets: the machine's noise only adds), against this tree's floor:")
    for name, _ in codes:
        mine = [r for r in rows if r["code"] == name]
        wall = [r["wall"] / r["floors"][floor_of][0] for r in mine]
        cpu = [r["cpu"] / r["floors"][floor_of][1] for r in mine]
        print(f"- {name}: {statistics.median(wall):.2f}x ({min(wall):.2f}x) wall, {statistics.median(cpu):.2f}x "
              f"({min(cpu):.2f}x) CPU, {statistics.median(n / r['wall'] for r in mine):.1f} clips/s end to end; "
              f"packer CPU {statistics.median(r['cpu'] for r in mine):.2f} s ({min(r['cpu'] for r in mine):.2f} s)")
    if args.baseline:
        verdicts = [compare_outputs(a["out"], b["out"]) for a, b in zip(rows[::2], rows[1::2])]
        print(f"\n{args.baseline}'s output vs this tree's: "
              + "; ".join(f"{v} ({verdicts.count(v)} of {len(verdicts)} repeats)" for v in dict.fromkeys(verdicts)))
    print(f"(work folder: {work}; load average at the end {os.getloadavg()[0]:.1f}, other jobs included)")


def flac_bytes_16k(files: list[str]) -> int:
    total = 0
    for path in files:
        audio = decode_audio(path).audio
        buf = io.BytesIO()
        soundfile.write(buf, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        total += len(buf.getvalue())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="short clips: the packer against the floor (module doc)")
    parser.add_argument("--clips", type=int, help="clips to generate (default: 240; 2000 with --short)")
    parser.add_argument("--min-seconds", type=float, help="default: 1 (2 with --short)")
    parser.add_argument("--max-seconds", type=float, help="default: 30 (10 with --short)")
    parser.add_argument("--corpus", type=Path, help="reuse or create the corpus here")
    parser.add_argument("--workers", type=int, help="default: all cores (1 with --short)")
    parser.add_argument("--repeat", type=int, default=8, help="hard-linked copies of each clip (amortise start-up)")
    parser.add_argument("--baseline", help="--short: git revision whose packer gives the baseline rows")
    parser.add_argument("--repeats", type=int, default=3, help="--short: rows per code, alternating")
    args = parser.parse_args()
    for name, default, short in (("clips", 240, 2000), ("min_seconds", 1.0, 2.0), ("max_seconds", 30.0, 10.0),
                                 ("workers", os.cpu_count(), 1)):
        if getattr(args, name) is None:
            setattr(args, name, short if args.short else default)
    if args.short:
        short_clips(args)
        return

    work = Path(tempfile.mkdtemp(prefix="bench_pack_"))
    corpus = args.corpus or work / "corpus"
    if not (corpus / "train").is_dir():
        make_corpus(corpus, train=args.clips, validation=0, min_seconds=args.min_seconds,
                    max_seconds=args.max_seconds)
    if args.repeat > 1:
        corpus = replicate(corpus, args.repeat)
    files = [str(p) for p in audio_files(corpus)]
    audio_seconds = sum(soundfile.info(p).duration for p in files)
    n = len(files)
    print(f"corpus: {n} clips, {audio_seconds / 3600:.2f} h, {audio_seconds / n:.1f} s/clip on average; "
          f"{os.cpu_count()} cores; torch threads 1 for the single-process rows")

    import torch

    torch.set_num_threads(1)  # the single-process rows measure one core
    extractor = WhisperFeatureExtractor(feature_size=80)
    seed_features(files[0], extractor)  # warm-up: imports, filter banks
    seed_s = time_per_clip(lambda p: seed_features(p, extractor), files)
    seed_numpy_s = time_per_clip(lambda p: seed_features(p, extractor, numpy=True), files)
    floor_s = time_per_clip(decode_audio, files)
    wall_1, steady_1, _ = run_packer(corpus, work / "out1", 1)
    wall_n, steady_n, _ = run_packer(corpus, work / "outN", args.workers)
    rows = [  # (path, processes, clips/s)
        ("seed: librosa + extractor (default call: torch STFT on 30 s)", 1, n / seed_s),
        ("seed: librosa + extractor (numpy path)", 1, n / seed_numpy_s),
        ("floor: decode + resample only", 1, n / floor_s),
        ("shard_tools.pack --workers 1, end to end (start-up included)", 1, n / wall_1),
        ("shard_tools.pack --workers 1, once running", 1, steady_1),
        (f"shard_tools.pack --workers {args.workers}, end to end (start-up included)", args.workers, n / wall_n),
        (f"shard_tools.pack --workers {args.workers}, once running", args.workers, steady_n),
    ]
    seed_core, seed_numpy_core, floor_core = n / seed_s, n / seed_numpy_s, n / floor_s
    print("\n| path | processes | clips/s | clips/s per core | vs seed (default) per core "
          "| vs seed (numpy) per core | cost vs floor per core |")
    print("|---|---|---|---|---|---|---|")
    for name, procs, rate in rows:
        per_core = rate / procs
        print(f"| {name} | {procs} | {rate:.1f} | {per_core:.1f} | {per_core / seed_core:.2f}x | "
              f"{per_core / seed_numpy_core:.2f}x | {floor_core / per_core:.2f}x |")

    print(f"\ncontrol: decode + resample alone in {args.workers} processes runs "
          f"{floor_scaling(files, args.workers):.2f}x as fast as in one (the machine's own scaling)")
    shard_bytes = sum(p.stat().st_size for p in (work / "out1").rglob("*.tar"))
    flac = flac_bytes_16k(files)
    print("\n| storage | bytes | KB per audio second | vs 16-kHz FLAC |\n|---|---|---|---|")
    print(f"| shards (float16 log-mel, valid frames) | {shard_bytes} | {shard_bytes / audio_seconds / 1000:.1f} | "
          f"{shard_bytes / flac:.2f}x |")
    print(f"| 16-kHz mono FLAC of the same audio | {flac} | {flac / audio_seconds / 1000:.1f} | 1.00x |")
    identical = all((work / "out1" / p.relative_to(work / "outN")).read_bytes() == p.read_bytes()
                    for p in (work / "outN").rglob("*.tar"))
    print(f"\nshards byte-identical for --workers 1 and {args.workers}: {identical}")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
