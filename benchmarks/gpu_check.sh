#!/usr/bin/env bash
# One prepared GPU check (issue 7, item 9). Run from the repository root on a CUDA machine
# with the project installed (`pip install -e '.[extract]'` or the test extra):
#
#   bash benchmarks/gpu_check.sh              # an estimated 5-8 min on one H100 (never run on a GPU yet; steps below)
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
#   1. training throughput at paper dimensions with the corpus's length mix, one run:
#      plain padded reference, the project before issue 7, fp32, fp16 autocast +
#      GradScaler (the CUDA default), bf16 (FULL=1: + torch.compile), paper and official;
#   2. an end-to-end `taemi train` on a synthetic paper-dimension store with the default
#      precision (fp16 + grad scaling on CUDA): epochs, time per epoch, metrics;
#   3. the fine-tuning step (backbones + fusion) against the frozen-feature step
#      (needs transformers, faster-whisper and the packaged offline models);
#   4. extraction (offline profile) and the main job end to end (`taemi demo`).
#
# Each step has its own time limit and the script goes on when one fails; step status is
# in $OUT/steps.txt. Knobs (environment): DEVICE (cuda), PRECISION (fp16 for steps 2-3),
# STEPS (30 timed steps per throughput runner), WARMUP (3 untimed), PRESETS (paper official), CLIPS (1500), EPOCHS (4), FT_BATCH (32),
# FT_STEPS (10), FT_ARGS (more finetune_throughput.py options), DEMO_CLIPS (160), DEMO_EPOCHS
# (30), FULL (unset). A CPU smoke run of the whole script (~4 min on 2 cores):
#   DEVICE=cpu PRECISION=bf16 STEPS=1 WARMUP=1 PRESETS=official CLIPS=120 EPOCHS=1 FT_BATCH=2 FT_STEPS=1 FT_ARGS=--skip-paper \
#     DEMO_CLIPS=24 DEMO_EPOCHS=2 OUT=/tmp/gpu_smoke bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/taemi_gpu}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-fp16}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
: > "$OUT/steps.txt"

step() {  # step NAME LIMIT_S LOG COMMAND...: run with a time limit, log, record the status
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" > >(tee "$OUT/$log") 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/steps.txt"
}

{
  if [ "$DEVICE" != cpu ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee "$OUT/device.txt"

runners="plain before sdpa_ca eager bf16"
[ "$DEVICE" != cpu ] && runners="$runners fp16"
[ -n "${FULL:-}" ] && runners="$runners compiled compiled_fp16 compiled_bf16"
step throughput 240 throughput.txt $PY benchmarks/train_throughput.py --device "$DEVICE" --steps "${STEPS:-30}" \
  --warmup "${WARMUP:-3}" --presets ${PRESETS:-paper official} --runners $runners ${FULL:+--compile}

work=$(mktemp -d)
step synth 120 synth.txt $PY -m taemi synth --out "$work/data" --clips "${CLIPS:-1500}" --no-progress
step train 240 e2e.txt $PY -m taemi train --store "$work/data/store" --train "$work/data/train.csv" \
  --valid "$work/data/valid.csv" --out "$work/run" --set train.max_epochs="${EPOCHS:-4}" \
  --set train.device="$DEVICE" --set train.precision="$PRECISION" --set data.num_workers=4 --no-progress
cp "$work/run/metrics.json" "$work/run/history.csv" "$work/run/config.yaml" "$OUT/" 2>/dev/null

# fine-tuning vs frozen-feature steps: offline backbones (real weights) and paper-size ones
# (random weights), gradient checkpointing on, batch FT_BATCH clips of 6.9 s.
step finetune 240 finetune.txt $PY benchmarks/finetune_throughput.py --device "$DEVICE" --precision "$PRECISION" \
  --batch-size "${FT_BATCH:-32}" --steps "${FT_STEPS:-10}" --gradient-checkpointing ${FT_ARGS:-}

# extraction throughput on that machine and the main job: `taemi demo` generates talking-face
# clips, extracts them with the offline profile (its encoders run on the CPU: onnxruntime's CPU
# provider) and trains on the device; its summary holds the extraction's media seconds, wall
# seconds and per-stage seconds (needs the `extract` extra).
step demo 300 demo.txt $PY -m taemi demo --out "$work/demo" --clips "${DEMO_CLIPS:-160}" \
  --epochs "${DEMO_EPOCHS:-30}" --no-progress
cp "$work/demo/summary.json" "$OUT/demo_summary.json" 2>/dev/null
cp "$work/demo/features/extract_summary.json" "$OUT/demo_extract_summary.json" 2>/dev/null
echo "outputs in $OUT"; cat "$OUT/steps.txt"
