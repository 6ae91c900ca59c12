#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels a GPU image without one lacks, into the ignored
# `.whl/` folder that `bash bench/gpu.sh` installs from (pass `.whl` in the device run's `carry`).
# The list and the pip command are ../shared/FACTS.md's (Python 3.12, manylinux, the H100 image seen
# 2026-11-26), plus scipy and threadpoolctl, which the log-mel needs since issue 12, and pytest-timeout,
# which setup.cfg's `--timeout=600` needs before any test starts (the image has pytest): about 51 MB in all.
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0 tensorboardX==2.6.5 soundfile==0.14.0 cffi==2.0.0
        pycparser==2.23 soxr==1.1.0 librosa==0.11.0 audioread==3.1.0 decorator==5.2.1 pooch==1.9.0
        platformdirs==4.14.8 transformers==5.24.0 scipy==1.17.1 threadpoolctl==3.8.0 pytest-timeout==2.4.0)
mkdir -p .whl
exclude=$(git rev-parse --git-path info/exclude)  # also right in a worktree, where .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
echo "$(ls .whl | wc -l) wheels, $(du -sm .whl | cut -f1) MB in .whl/ (a device run carries at most 64 MiB)"
