"""Another git revision's code for a benchmark's baseline rows, measured in the same run as this
tree's: ``git archive REV`` unpacked into a temporary folder (the working tree is left alone)."""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout(rev: str) -> Path:
    """A folder holding the files of ``rev`` (e.g. ``main``), as ``git archive`` gives them."""
    data = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    out = Path(tempfile.mkdtemp(prefix="bench_baseline_"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out, filter="data")
    return out
