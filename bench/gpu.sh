#!/usr/bin/env bash
# The whole GPU check in one command (issue 11), meant to finish within 8 minutes on one H100:
#   bash bench/gpu.sh            on a GPU machine: install, synthetic corpus, pack, then
#     bench/train_step.py rows (whisper-small dims batch 32, built-in tiny batch 64; in-memory, shards
#     with 0/2/4 workers, the seed loader; the pre-issue-11 code's rows beside them, --baseline),
#     the loader handover (bench/stream.py --handover --device cuda), train_stream.py end to end with
#     bf16 and torch.compile, infer_stream.py; bench/infer.py (issue 12: whisper-small dims, bf16, 30
#     tokens forced, batch 64 and 256: static decoder vs HF generate vs the encoder alone, end to end
#     and on the same batches); the tables, then one summary table.
#   bash bench/gpu.sh --cpu      the same steps, small and on the CPU, to know the script runs.
# Install: with a `.whl/` folder (wheels fetched on a machine with an index: `bash bench/gpu_wheels.sh`) they
# are installed into /tmp/site without an index, as on the GPU image that reaches none; without one,
# scripts/install.sh (keeps the machine's torch when it meets setup.cfg).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
work=${GPU_BENCH_DIR:-/tmp/gpu_bench}
mkdir -p "$work"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
elif [ "$mode" != --cpu ]; then
  bash scripts/install.sh
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# every module the steps import beyond torch and transformers, named at once when one is missing
# (scipy and threadpoolctl: the log-mel since issue 12; a GPU image may lack them as it lacks librosa)
python3 - <<'PY'
import importlib.util, sys
needed = ["webdataset", "braceexpand", "librosa", "soundfile", "soxr", "scipy", "threadpoolctl", "omegaconf",
          "tensorboardX", "accelerate", "tqdm", "yaml"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing: {' '.join(missing)}: put their wheels in .whl/ (../shared/FACTS.md says how)")
PY
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, \
'| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
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
  decode=(--device cpu --model-dims tiny --max-new-tokens 5 --workers 0 --decode-batches 1); decode_batches=(8)
else
  device=(--device cuda --bf16 --peak-tflops 989); clips=1024
  small=(--batch-size 32 --workers 0 2 4 --seed-workers 4 "${baseline[@]}")
  tiny=(--batch-size 64 --workers 0 2 4 --seed-workers 4 "${baseline[@]}"); train=(trainer_config.max_steps=200 trainer_config.per_device_train_batch_size=64
    ++trainer_config.bf16=true model_config.torch_compile=true); infer=(--batch_size 64 --bf16)
  handover=(--batch-size 64 --device cuda)
  decode=(--device cuda --model-dims whisper-small --max-new-tokens 30 --workers 4 --decode-batches 4)
  decode_batches=(64 256)
fi
t0=$(date +%s)
[ -d "$work/data/shards/train" ] || {
  python3 -m shard_tools.synth "$work/data/corpus" --train "$clips" --validation 64 >/dev/null
  python3 -m shard_tools.pack "$work/data/corpus" --out "$work/data/shards" >/dev/null; }
shards=$work/data/shards/train
echo "== corpus and shards: $(( $(date +%s) - t0 )) s"
python3 bench/train_step.py --data "$work/data" --model-dims whisper-small "${device[@]}" "${small[@]}" | tee "$work/small.md"
python3 bench/train_step.py --data "$work/data" --model-dims tiny "${device[@]}" "${tiny[@]}" | tee "$work/tiny.md"
python3 bench/stream.py --handover --data "$work/data" --workers 2 "${handover[@]}" "${baseline[@]}" | tee "$work/handover.md"
rm -rf "$work/run"
start=$(date +%s)
python3 train_stream.py --shards "$shards" --val-shards "$work/data/shards/validation" \
  trainer_config.output_dir="$work/run" trainer_config.logging_steps=10 trainer_config.eval_steps=100000 \
  trainer_config.save_steps=100000 "${train[@]}" 2>&1 | tail -3
train_s=$(( $(date +%s) - start ))
start=$(date +%s)
python3 infer_stream.py --model_name "$work/run/final" --shards "$work/data/shards/validation" \
  --output "$work/preds.jsonl" --metrics bleu "${infer[@]}" | tail -4
infer_s=$(( $(date +%s) - start ))
for b in "${decode_batches[@]}"; do  # the seed's float32 loop at 64 only: its batch of 256 costs minutes
  seed=(); [ "$b" -gt 64 ] && seed=(--no-seed)
  python3 bench/infer.py --data "$work/data" --clips "$clips" --rounds 1 --batch-size "$b" "${decode[@]}" \
    "${seed[@]}" | tee "$work/infer-$b.md"
done
echo
echo "| check | result |"
echo "|---|---|"
for name in small tiny; do
  grep -E '^\| (in-memory|streamed|seed)' "$work/$name.md" | sed "s/^| /| $name: /"
done
grep -E '^loader time' "$work/handover.md" | sed 's/^/| handover | /; s/$/ |/'
echo "| train_stream.py end to end (${train[*]}) | ${train_s} s, $(tail -1 "$work/run/metrics.jsonl" | cut -c1-120) |"
echo "| infer_stream.py (${infer[*]}) | ${infer_s} s, $(wc -l < "$work/preds.jsonl") captions |"
for b in "${decode_batches[@]}"; do
  grep -E '^\| (seed|infer_stream|encoder only|generate_captions)' "$work/infer-$b.md" | sed "s/^| /| infer batch $b: /"
  grep -E '^static vs HF' "$work/infer-$b.md" | sed "s/^/| infer batch $b | /; s/$/ |/"
done
echo "| whole script | $(( $(date +%s) - t0 )) s |"
