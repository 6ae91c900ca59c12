#!/usr/bin/env bash
# The whole job, offline, on built-in data and the built-in tiny Whisper (README: how long it takes):
# generate a learnable captioning corpus → pack it into log-mel shards → train → caption the held-out
# split → score it next to the most-common-caption baseline. Everything lands in $DEMO_DIR (demo_run/).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-demo_run}
STEPS=${DEMO_STEPS:-240}
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== 1/4 a synthetic corpus: tones, chirps, noise and clicks, low or high, short or long"
[ -d "$DEMO_DIR/corpus/train" ] || python -m shard_tools.synth "$DEMO_DIR/corpus" --train 480 --validation 64

echo "== 2/4 pack it into shards of precomputed Whisper log-mel features"
python -m shard_tools.pack "$DEMO_DIR/corpus" --out "$DEMO_DIR/data" --samples-per-shard 100 --overwrite

echo "== 3/4 train the built-in tiny Whisper for $STEPS steps on CPU"
python train_stream.py --shards "$DEMO_DIR/data/train" --val-shards "$DEMO_DIR/data/validation" \
  paths.output_dir="$DEMO_DIR/outputs" trainer_config.max_steps="$STEPS" \
  ++trainer_config.learning_rate=2e-3 trainer_config.warmup_steps=20 trainer_config.lr_scheduler_type=cosine \
  trainer_config.eval_steps=120 trainer_config.save_steps=120 trainer_config.logging_steps=20 \
  ++trainer_config.dataloader_num_workers=1

echo "== 4/4 caption the held-out clips and score them"
python infer_stream.py --model-name "$DEMO_DIR/outputs/whisper-caption/final" --shards "$DEMO_DIR/data/validation" \
  --output "$DEMO_DIR/preds.jsonl" --metrics-out "$DEMO_DIR/metrics.json" --num-dataloader-workers 1
python scripts/demo_report.py --train-shards "$DEMO_DIR/data/train" --predictions "$DEMO_DIR/preds.jsonl" \
  --out "$DEMO_DIR/report.json"
