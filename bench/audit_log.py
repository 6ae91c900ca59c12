"""Cost of the sample audit log (``trainer_config.log_sample_keys``) per optimizer step.

    python bench/audit_log.py [--keys 64] [--steps 20000] [--train-steps 40]

Two measurements, each with its baseline in the same run:
- the log itself: ``train_stream.SampleKeysLog.write`` for a step of ``--keys`` keys shaped like
  packed keys (``train/000123_<32 hex>``), enabled against disabled (the call a run makes when the
  setting is off), mean over ``--steps`` calls into a file on this disk;
- a whole run: ``train_stream.py`` on the built-in tiny model, ``--train-steps`` steps of batch 16 on
  synthetic shards, with and without the log (each in a fresh process), seconds per step from
  wall time (start-up included in both, so compare the difference, not the level).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_cost(folder: Path, keys: int, steps: int, enabled: bool) -> float:
    """Mean seconds per ``SampleKeysLog.write`` call."""
    from pipeline.train_logs import SampleKeysLog

    accelerator = SimpleNamespace(is_main_process=True, process_index=0, wait_for_everyone=lambda: None)
    log = SampleKeysLog(folder, accelerator, start_step=0, enabled=enabled)
    names = [f"train/{i:06d}_{i * 2654435761 % 2 ** 128:032x}" for i in range(keys)]
    start = time.perf_counter()
    for step in range(steps):
        log.write(step + 1, 0, names)
    elapsed = time.perf_counter() - start
    log.close()
    return elapsed / steps


def run_seconds(shards: str, out: Path, steps: int, audit: bool) -> float:
    cmd = [sys.executable, str(ROOT / "train_stream.py"), "--shards", shards, f"trainer_config.output_dir={out}",
           f"trainer_config.max_steps={steps}", "trainer_config.per_device_train_batch_size=16",
           "trainer_config.save_steps=100000", "trainer_config.eval_steps=100000", "trainer_config.logging_steps=10",
           "++trainer_config.dataloader_num_workers=1", f"++trainer_config.log_sample_keys={str(audit).lower()}"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--train-steps", type=int, default=40)
    args = parser.parse_args()
    from shard_tools.synth import write_mel_shards

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        off = write_cost(tmp / "off", args.keys, args.steps, enabled=False)
        on = write_cost(tmp / "on", args.keys, args.steps, enabled=True)
        write_mel_shards(tmp / "train", [160, 160])
        shards = str(tmp / "train")
        runs = {audit: run_seconds(shards, tmp / f"run-{audit}", args.train_steps, audit) for audit in (False, True)}
        lines = sum(1 for _ in open(tmp / "run-True" / "sample_keys" / "rank-0.jsonl"))
    print(json.dumps({"keys_per_step": args.keys, "write_us_off": off * 1e6, "write_us_on": on * 1e6,
                      "run_s_off": runs[False], "run_s_on": runs[True], "train_steps": args.train_steps,
                      "audit_lines": lines}))
    print(f"| measure | log off | log on | difference |\n|---|---|---|---|\n"
          f"| `SampleKeysLog.write`, {args.keys} keys, µs per step | {off * 1e6:.2f} | {on * 1e6:.1f} | "
          f"{(on - off) * 1e6:+.1f} |\n"
          f"| tiny model, batch 16, {args.train_steps} steps, wall s (start-up included) | {runs[False]:.1f} | "
          f"{runs[True]:.1f} | {runs[True] - runs[False]:+.1f} ({(runs[True] / runs[False] - 1) * 100:+.1f} %) |")


if __name__ == "__main__":
    main()
