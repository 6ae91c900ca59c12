#!/usr/bin/env bash
# Install the project and its test, metrics and Hugging Face dataset extras into the current Python
# environment, and a Java runtime for METEOR where none is on the PATH (Debian package, needs root).
# torch is pinned to the release tested here: on these machines `torch==2.13.0` is a CPU wheel
# on local disk, while an unpinned `torch` pulls a multi-GB CUDA build. On a GPU machine install
# the torch build you want first; this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "install 1/4: torch (a few minutes the first time, seconds once installed)"
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v -i "running pip as the 'root'" || true
python -c "import torch" 2>/dev/null || { echo "torch failed to install" >&2; exit 1; }
echo "install 2/4: the project and its dependencies (transformers, accelerate, librosa, tensorboard, ...)"
python -m pip install -q --disable-pip-version-check -e ".[test,metrics,hf]" 2>&1 | grep -v -i "running pip as the 'root'" || true
echo "install 3/4: a Java runtime for METEOR"
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless) >/dev/null \
      || echo "could not install a Java runtime: METEOR will be reported as unavailable" >&2
  else
    echo "no java on the PATH: METEOR will be reported as unavailable (install a JRE to score it)" >&2
  fi
fi
echo "install 4/4: checking the imports"
python -c "import pipeline, shard_tools, webdataset, transformers, accelerate, soxr, tiktoken, datasets" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
echo "installed"
