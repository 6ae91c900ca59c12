#!/usr/bin/env bash
# Install the project and its test, metrics, Hugging Face dataset and LoRA (peft) extras into the current Python
# environment, and a Java runtime for METEOR where none is on the PATH (Debian package, needs root).
# torch: an importable torch that meets setup.cfg's requirement is kept as it is (a GPU machine's
# CUDA build stays). Only when torch is missing or older is `torch==2.13.0` installed: on these
# machines a CPU wheel on local disk, while an unpinned `torch` pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "install 1/4: torch (a few minutes the first time, seconds once installed)"
# the lower bound, as setup.cfg writes it (torch>=X.Y), and whether the installed torch meets it
need=$(python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
print(next(r for r in c['options']['install_requires'].split() if r.startswith('torch>=')).split('>=')[1])")
if python -c "import re, sys, torch; v = lambda s: tuple(int(x) for x in re.findall(r'\d+', s)[:3]); \
sys.exit(v(torch.__version__) < v('$need'))" 2>/dev/null; then
  echo "keeping torch $(python -c 'import torch; print(torch.__version__)') (setup.cfg: torch>=$need)"
else
  echo "no importable torch>=$need: installing torch==2.13.0"
  python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v -i "running pip as the 'root'" || true
fi
python -c "import torch" 2>/dev/null || { echo "torch failed to install" >&2; exit 1; }
echo "install 2/4: the project and its dependencies (transformers, accelerate, librosa, tensorboard, ...)"
python -m pip install -q --disable-pip-version-check -e ".[test,metrics,hf,lora]" 2>&1 | grep -v -i "running pip as the 'root'" || true
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
python -c "import pipeline, shard_tools, webdataset, transformers, accelerate, soxr, tiktoken, datasets, peft" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
echo "installed"
