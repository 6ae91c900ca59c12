#!/usr/bin/env bash
# Install the project and its test/metrics extras into the current Python environment.
# torch is pinned to the release tested here: on these machines `torch==2.13.0` is a CPU wheel
# on local disk, while an unpinned `torch` pulls a multi-GB CUDA build. On a GPU machine install
# the torch build you want first; this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v -i "running pip as the 'root'" || true
python -c "import torch" 2>/dev/null || { echo "torch failed to install" >&2; exit 1; }
python -m pip install -q --disable-pip-version-check -e ".[test,metrics]" 2>&1 | grep -v -i "running pip as the 'root'" || true
python -c "import pipeline, shard_tools, webdataset, transformers, accelerate, soxr, tiktoken" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
