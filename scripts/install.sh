#!/usr/bin/env bash
# Install the project and its test, metrics, Hugging Face dataset and LoRA (peft) extras into the current Python
# environment, and the system programs missing from the PATH (Debian packages, one apt-get run, needs root):
# a Java runtime for METEOR, ffmpeg (decodes m4a/aac, webm, wma for librosa's audioread fallback), and sox
# (with its MP3 handler) and espeak-ng, which write the tests' corpus of audio from other encoders.
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
echo "install 3/4: system programs: a Java runtime for METEOR, ffmpeg, sox, espeak-ng"
# sox without libsox-fmt-all cannot write MP3 (the test corpus's LAME files); captured, not piped into
# grep -q, whose early exit would fail the pipe under pipefail
sox_mp3() { command -v sox >/dev/null 2>&1 && [[ "$(sox -h 2>/dev/null)" == *"FORMATS:"*" mp3 "* ]]; }
packages=()
command -v java >/dev/null 2>&1 || packages+=(default-jre-headless)
command -v ffmpeg >/dev/null 2>&1 || packages+=(ffmpeg)
sox_mp3 || packages+=(sox libsox-fmt-all)
command -v espeak-ng >/dev/null 2>&1 || packages+=(espeak-ng)
if [ "${#packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "apt-get install ${packages[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}") >/dev/null \
      || echo "could not install ${packages[*]} (apt-get failed): see the lines below for what that costs" >&2
  else
    echo "not root or no apt-get: install ${packages[*]} with the system's package manager" >&2
  fi
fi
command -v java >/dev/null 2>&1 \
  || echo "no java on the PATH: METEOR will be reported as unavailable (install a JRE to score it)" >&2
command -v ffmpeg >/dev/null 2>&1 \
  || echo "no ffmpeg on the PATH: m4a/aac, webm and wma files will be rejected as undecodable (install ffmpeg)" >&2
{ sox_mp3 && command -v espeak-ng >/dev/null 2>&1; } \
  || echo "no sox with MP3 or no espeak-ng: the tests on audio from other encoders will skip (and fail under CI)" >&2
echo "install 4/4: checking the imports"
python -c "import pipeline, shard_tools, webdataset, transformers, accelerate, soxr, tiktoken, datasets, peft" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
echo "installed"
