#!/usr/bin/env bash
# One prepared GPU check (run on a CUDA machine from the repo root; no install needed
# where torch, numpy, safetensors, pyyaml, tqdm and matplotlib are present):
#   1. CUDA training throughput at paper dimensions, fp32 vs fp16 autocast + GradScaler
#      vs bf16 autocast, eager and torch.compile, paper and official presets;
#   2. an end-to-end `taemi train` on a synthetic paper-dimension store with the
#      default precision (fp16 + grad scaling on CUDA): epochs, time per epoch, metrics;
#   3. the fine-tuning step (backbones + fusion) against the frozen-feature step, fp16
#      (needs transformers, faster-whisper and the packaged offline models).
#   4. extraction throughput (offline profile) and the main job end to end (`taemi demo`).
# Writes everything under ${OUT:-/tmp/taemi_gpu}.
set -uo pipefail
OUT=${OUT:-/tmp/taemi_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"

# fp32 vs fp16 (autocast + GradScaler, the recipe's CUDA default) in one run each;
# FULL=1 adds bf16 and torch.compile.
$PY benchmarks/train_throughput.py --device cuda --precision fp32 --steps 30 --presets paper official \
  2>&1 | tee "$OUT/throughput_fp32.txt"
$PY benchmarks/train_throughput.py --device cuda --precision fp16 --steps 30 --presets paper official \
  ${FULL:+--compile} 2>&1 | tee "$OUT/throughput_fp16.txt"
if [ -n "${FULL:-}" ]; then
  $PY benchmarks/train_throughput.py --device cuda --precision bf16 --steps 30 --presets paper official \
    2>&1 | tee "$OUT/throughput_bf16.txt"
fi

work=$(mktemp -d)
$PY -m taemi synth --out "$work/data" --clips ${CLIPS:-1500} --no-progress 2>&1 | tail -n 3 | tee "$OUT/e2e.txt"
$PY -m taemi train --store "$work/data/store" --train "$work/data/train.csv" --valid "$work/data/valid.csv" \
  --out "$work/run" --set train.max_epochs=${EPOCHS:-4} --set data.num_workers=4 --no-progress 2>&1 | tee -a "$OUT/e2e.txt"
cp "$work/run/metrics.json" "$work/run/history.csv" "$OUT/" 2>/dev/null
grep -E '"(device|precision|best_epoch|mean_pearson)"' "$work/run/metrics.json" | tee -a "$OUT/e2e.txt"

# fine-tuning vs frozen-feature steps: offline backbones (real weights) and paper-size ones
# (random weights), gradient checkpointing on and off, batch 32 clips of 6.9 s.
$PY benchmarks/finetune_throughput.py --device cuda --precision fp16 --batch-size ${FT_BATCH:-32} --steps 10 \
  --gradient-checkpointing 2>&1 | tee "$OUT/finetune_fp16.txt"

# 4. extraction throughput on that machine and an end-to-end main job: `taemi demo` generates
# 160 talking-face clips, extracts them with the offline profile (CPU encoders: its DINOv2 runs
# on onnxruntime's CPU provider) and trains on the GPU; the summary holds the extraction's
# media seconds, wall seconds and per-stage seconds (needs the `extract` extra).
$PY -m taemi demo --out "$work/demo" --no-progress 2>&1 | tail -n 12 | tee "$OUT/demo.txt"
cp "$work/demo/summary.json" "$OUT/demo_summary.json" 2>/dev/null
cp "$work/demo/features/extract_summary.json" "$OUT/demo_extract_summary.json" 2>/dev/null
