#!/usr/bin/env bash
# The GPU check in parts, each meant to finish well inside one 600-s device command on one H100:
#   bash bench/gpu.sh [--cpu] [--part NAME ...]     (no --part: every part, in this order)
#   tests      the CUDA tests (the skipif-marked tests of the files that hold NEEDS_CUDA ones): the
#              cheapest proof; on a GPU none may skip for want of CUDA
#   tiny       bench/train_step.py, built-in tiny batch 64: in-memory, shards with 0/2/4 workers, the
#              seed loader, the pre-issue-11 code's rows beside them (--baseline, where git has it)
#   small      the same for whisper-small dims at batch 32, without the baseline rows (FACTS.md has them)
#   handover   bench/stream.py --handover --device cuda (the loader's main-process time per batch)
#   train      train_stream.py end to end, bf16 and torch.compile, 200 steps; then infer_stream.py --bf16
#   infer64    bench/infer.py (issue 12), whisper-small dims, bf16, 30 tokens forced, batch 64: the static
#              decoder vs HF generate (dynamic cache, and static cache, which HF compiles on a GPU) vs
#              the encoder alone, end to end and on the same batches; the seed's float32 loop too
#   infer256   the same at batch 256, without the seed's loop (its float32 batch costs minutes)
#   window     issue 23: bench/train_step.py on 10-s clips, whisper-small dims, bf16, batch 32, encoder
#              windows full, fit (5-s steps: a 10-s clip's 1,002 frames take 15 s) and fit:1 side by side
#   window-infer  bench/infer.py on the same clips: infer_stream.py --shards --audio-window full / fit /
#              fit (1-s step), batch 64, 30 tokens, captions compared with the plain --shards row's
#   bash bench/gpu.sh --cpu      the same parts, small and on the CPU, to know the script runs.
# Each part runs under `timeout` (GPU_PART_TIMEOUT, default 480 s: with the install and the corpus, one
# part fits one 600-s device command) in its own process and writes its table to $GPU_BENCH_TABLES
# (default $GPU_BENCH_DIR/tables) as it goes, so a part that runs out of time keeps the rows it finished
# and the parts after it still run; the summary table is printed from whatever tables exist
# (summary.md beside them). On a device machine set GPU_BENCH_TABLES=$OUT.
# Install (not with --cpu): with a `.whl/` folder (wheels fetched on a machine with an index:
# `bash bench/gpu_wheels.sh`) they are installed into /tmp/site without an index, as on the GPU image
# that reaches none; without one, scripts/install.sh (keeps the machine's torch when it meets setup.cfg).
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=(tests tiny small handover train infer64 infer256 window window-infer)
mode=gpu parts=() inner=
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) mode=--cpu ;;
    --part) parts+=("${2:?--part needs a name: ${PARTS[*]}}"); shift ;;
    --in-part) inner=$2; shift ;;  # one part, in the process `timeout` watches
    *) echo "bench/gpu.sh: unknown argument '$1' (use --cpu, --part NAME: ${PARTS[*]})" >&2; exit 2 ;;
  esac
  shift
done
for p in "${parts[@]}"; do
  [[ " ${PARTS[*]} " == *" $p "* ]] || { echo "bench/gpu.sh: --part '$p': choose from ${PARTS[*]}" >&2; exit 2; }
done
[ ${#parts[@]} -gt 0 ] || parts=("${PARTS[@]}")
work=${GPU_BENCH_DIR:-/tmp/gpu_bench}
tables=${GPU_BENCH_TABLES:-$work/tables}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# the code before issue 11 gives the baseline rows (where git has it: a copied checkout may not)
rev=${GPU_BENCH_BASELINE:-3633175}
baseline=()
git rev-parse -q --verify "$rev^{commit}" >/dev/null 2>&1 && baseline=(--baseline "$rev")
if [ "$mode" = --cpu ]; then  # whisper-small dims cost ~1 min a row on 2 cores: one streamed row, no baseline
  device=(--device cpu); clips=96; small=(--batch-size 2 --steps 1 --warmup 1 --workers 0 --seed-workers)
  tiny=(--batch-size 8 --steps 2 --warmup 1 --workers 0 2 --seed-workers 2 "${baseline[@]}")
  train=(trainer_config.max_steps=4 trainer_config.per_device_train_batch_size=4
    ++trainer_config.bf16=true model_config.torch_compile=false); infer=(--batch_size 8)
  handover=(--batch-size 8 --batches 4 --repeats 1 --step-ms 50)
  decode=(--device cpu --model-dims tiny --max-new-tokens 5 --workers 0 --decode-batches 1); infer64=(--batch-size 8)
  infer256=(--batch-size 16 --no-seed)
  # tiny sizes: the window parts only show that they run here
  window=(--model-dims tiny --clips 8 --batch-size 4 --steps 1 --warmup 1)
  window_infer=(--model-dims tiny --clips 8 --batch-size 4 --max-new-tokens 5 --workers 0)
else
  device=(--device cuda --bf16 --peak-tflops 989); clips=1024
  small=(--batch-size 32 --workers 0 2 4 --seed-workers 4)
  tiny=(--batch-size 64 --workers 0 2 4 --seed-workers 4 "${baseline[@]}"); train=(trainer_config.max_steps=200 trainer_config.per_device_train_batch_size=64
    ++trainer_config.bf16=true model_config.torch_compile=true); infer=(--batch_size 64 --bf16)
  handover=(--batch-size 64 --device cuda)
  decode=(--device cuda --model-dims whisper-small --max-new-tokens 30 --workers 4 --decode-batches 4)
  infer64=(--batch-size 64); infer256=(--batch-size 256 --no-seed)
  window=(--model-dims whisper-small --clips 256 --batch-size 32 --steps 20 --warmup 5)
  window_infer=(--model-dims whisper-small --clips 256 --batch-size 64 --max-new-tokens 30 --workers 4)
fi
windows=(--audio-window full fit fit:1)
shards=$work/data/shards/train

run_part() {  # the body of part $1, its tables in $tables/$1.md (tee: written as the rows come)
  local t0; t0=$(date +%s)
  case $1 in
    tests)
      local files; files=$(grep -l NEEDS_CUDA tests/test_*.py)
      # -m skipif: the tests carrying NEEDS_CUDA (those files have no other skipif)
      python3 -m pytest -q -rs -p no:cacheprovider -m skipif $files 2>&1 | tee "$tables/tests.md"
      if [ "$mode" != --cpu ] && grep -q "needs a CUDA device" "$tables/tests.md"; then
        echo "CUDA tests skipped on a GPU machine: torch sees no CUDA device" >&2; return 1
      fi ;;
    tiny|small)
      local dims=$([ "$1" = small ] && echo whisper-small || echo tiny) opts
      [ "$1" = small ] && opts=("${small[@]}") || opts=("${tiny[@]}")
      python3 bench/train_step.py --data "$work/data" --model-dims "$dims" "${device[@]}" "${opts[@]}" \
        | tee "$tables/$1.md" ;;
    handover)
      python3 bench/stream.py --handover --data "$work/data" --workers 2 "${handover[@]}" "${baseline[@]}" \
        | tee "$tables/handover.md" ;;
    train)
      rm -rf "$work/run"
      python3 train_stream.py --shards "$shards" --val-shards "$work/data/shards/validation" \
        trainer_config.output_dir="$work/run" trainer_config.logging_steps=10 trainer_config.eval_steps=100000 \
        trainer_config.save_steps=100000 "${train[@]}" 2>&1 | tail -3
      echo "| train_stream.py end to end (${train[*]}) | $(( $(date +%s) - t0 )) s, $(tail -1 "$work/run/metrics.jsonl" \
        | cut -c1-120) |" | tee "$tables/train.md"
      t0=$(date +%s)
      python3 infer_stream.py --model_name "$work/run/final" --shards "$work/data/shards/validation" \
        --output "$work/preds.jsonl" --metrics bleu "${infer[@]}" | tail -4
      echo "| infer_stream.py (${infer[*]}) | $(( $(date +%s) - t0 )) s, $(wc -l < "$work/preds.jsonl") captions |" \
        | tee -a "$tables/train.md" ;;
    window)  # its 10-s clips in $work/data/clips-10s, which window-infer reads too
      python3 bench/train_step.py --data "$work/data" --clip-seconds 10 --workers "${device[@]}" "${window[@]}" \
        "${windows[@]}" | tee "$tables/window.md" ;;
    window-infer)
      python3 bench/infer.py --data "$work/data/clips-10s" --min-seconds 10 --max-seconds 10 --rounds 1 \
        --only-windows "${device[0]}" "${device[1]}" "${window_infer[@]}" "${windows[@]}" \
        | tee "$tables/window-infer.md" ;;
    infer64|infer256)
      local -n opts=$1
      python3 bench/infer.py --data "$work/data" --clips "$clips" --rounds 1 "${decode[@]}" "${opts[@]}" \
        | tee "$tables/$1.md" ;;
  esac
}

if [ -n "$inner" ]; then
  run_part "$inner"
  exit
fi

mkdir -p "$work" "$tables"
if [ "$mode" = --cpu ]; then  # this machine's own packages (.whl/ holds the GPU image's Python 3.12 wheels)
  :
elif [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  bash scripts/install.sh
fi
# every module the parts import beyond torch and transformers, named at once when one is missing
# (scipy and threadpoolctl: the log-mel since issue 12; pytest_timeout: setup.cfg's --timeout)
python3 - <<'PY'
import importlib.util, sys
needed = ["webdataset", "braceexpand", "librosa", "soundfile", "soxr", "scipy", "threadpoolctl", "omegaconf",
          "tensorboardX", "accelerate", "tqdm", "yaml", "pytest", "pytest_timeout"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing: {' '.join(missing)}: put their wheels in .whl/ (bash bench/gpu_wheels.sh)")
PY
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, \
'| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
t0=$(date +%s)
if [ "${parts[*]}" != tests ] && [ ! -d "$shards" ]; then
  python3 -m shard_tools.synth "$work/data/corpus" --train "$clips" --validation 64 >/dev/null
  python3 -m shard_tools.pack "$work/data/corpus" --out "$work/data/shards" >/dev/null
  echo "== corpus and shards: $(( $(date +%s) - t0 )) s"
fi
failed=() cpu=()
[ "$mode" = gpu ] || cpu=(--cpu)
for part in "${parts[@]}"; do
  start=$(date +%s)
  echo "== part $part"
  rc=0
  timeout --kill-after=15 "${GPU_PART_TIMEOUT:-480}" bash "$0" "${cpu[@]}" --in-part "$part" || rc=$?
  echo "== part $part: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$tables/parts.md"
  [ "$rc" = 0 ] || failed+=("$part")
done

rows() { [ -f "$tables/$2.md" ] && grep -E "$1" "$tables/$2.md" || true; }  # a part not run or cut short: none
{
  echo "| check | result |"
  echo "|---|---|"
  for name in tiny small; do
    rows '^\| (in-memory|streamed|seed)' "$name" | sed "s/^| /| $name: /"
  done
  rows '^loader time' handover | sed 's/^/| handover | /; s/$/ |/'
  rows '^\| ' train
  rows '^\| (in-memory|streamed)' window | sed "s/^| /| window: /"
  rows '^\| infer_stream' window-infer | sed "s/^| /| window-infer: /"
  for name in infer64 infer256; do
    rows '^\| (seed|infer_stream|encoder only|generate_captions|HF generate)' "$name" | sed "s/^| /| $name: /"
    rows '^(static vs HF|HF generate)' "$name" | sed "s/^/| $name | /; s/$/ |/"
  done
  echo "| parts run (${parts[*]}) | $(( $(date +%s) - t0 )) s, failed: ${failed[*]:-none} |"
} | tee "$tables/summary.md"
[ ${#failed[@]} = 0 ]
