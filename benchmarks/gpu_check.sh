#!/usr/bin/env bash
# One prepared GPU check (issues 7 and 14). Run from the repository root on a CUDA machine
# with the project importable (PYTHONPATH=src is set here; `pip install -e .` not needed):
#
#   bash benchmarks/gpu_check.sh              # every step: over 10 min (limits below)
#   OUT=/some/dir SKIP="synth train finetune demo encoders" STEPS=20 E2E_EPOCHS=3 bash benchmarks/gpu_check.sh
#
# Issue 14's figures come first (throughput, throughput256, overhead, e2e: 5.2 min on an H200
# before overhead was added, within the 8 minutes); the compiled steps follow (their
# compilation is minutes of warm-up; not yet timed on a GPU). One device call allows 10 min,
# so run the encoders in a second call (benchmarks/README.md, "Results after issue 14, continued").
#
#   1. throughput: training steps at paper dimensions with the corpus's length mix, batch 32,
#      paper and official: fp32 eager, bf16 and fp16 autocast (attention restricted as the
#      trainer does) with autocast casting at each use and with the weights cast once per
#      step (the trainer's way), bf16 with torch's attention choice (cuDNN, the project
#      before issue 14), the captured step (CUDA graphs) in bf16 (both cast forms), fp32 and
#      fp16 (its grad scaler's cycle captured with it: the path of cards without bf16);
#      the card's name and its fp32 / bf16 / fp16 matmul rates are printed first;
#   2. throughput256: the same at batch 256 (paper: fp32, bf16 both forms, captured bf16 both
#      forms);
#      both throughput steps then profile each runner for PROFILE steps (its top kernels by
#      device time and how busy the device was: what bounds the step, in the same run);
#   overhead: the operations per training step and the time of a step at tiny shapes (what a
#      launch-bound step costs) for every step engine and precision (step_overhead.py);
#   3. e2e: `taemi train` end to end (benchmarks/train_e2e.py) on an E2E_TRAIN + E2E_VALID
#      clip paper-dimension store with the real length mix: the default (bf16, captured
#      steps, batches resident on the device) against fp32 eager DataLoader batches;
#      start-up, seconds per epoch with validation, projected 50-epoch time;
#   compiled256, compiled32: the captured bf16 step against the same step compiled first
#      (`train.compile=true` with captured steps: fused kernels in the graphs), paper preset,
#      batch 256 and 32 (COMPILED_BATCHES); the compilation is warm-up (printed), one
#      process each;
#   4. synth + train: a small `taemi train` with the CLI on a synthetic store (PRECISION);
#   5. the fine-tuning step against the frozen-feature step (needs transformers,
#      faster-whisper and the packaged offline models);
#   6. encoders: the extraction encoders on the device vs the CPU, fp32 and fp16
#      (benchmarks/encoders_device.py);
#   7. extraction (offline profile) and the main job end to end (`taemi demo`).
#
# Each step has its own time limit and the script goes on when one fails; step status is
# in $OUT/steps.txt. Knobs (environment): DEVICE (cuda), PRECISION (auto), STEPS (30 timed
# steps per throughput runner), WARMUP (3 untimed), PRESETS (paper official), RUNNERS (the
# batch-32 runners), BIG_BATCH (256), E2E_TRAIN (8072), E2E_VALID (1000), E2E_EPOCHS (4),
# E2E_PRESET (paper), COMPILED_BATCHES (256 32), OVERHEAD_BATCH (32), OVERHEAD_ROUNDS (7), PROFILE (5 profiled steps per runner, 0: none), CLIPS (1500), EPOCHS (4), FT_BATCH (32), FT_STEPS (10), FT_ARGS (more
# finetune_throughput.py options), ENC_SIZE (real), ENC_ITEMS (64), ENC_CPU_ITEMS (8), DEMO_CLIPS (160), DEMO_EPOCHS (30), SKIP (step names to
# leave out), FULL (unset: + torch.compile runners). A CPU smoke run of the whole script
# (~5 min on 2 cores):
#   DEVICE=cpu PRECISION=bf16 STEPS=1 WARMUP=1 PRESETS=official BIG_BATCH=4 COMPILED_BATCHES=4 \
#     OVERHEAD_BATCH=4 OVERHEAD_ROUNDS=1 E2E_TRAIN=48 E2E_VALID=16 \
#     E2E_EPOCHS=2 E2E_PRESET=official CLIPS=120 EPOCHS=1 FT_BATCH=2 FT_STEPS=1 FT_ARGS=--skip-paper \
#     ENC_SIZE=tiny ENC_ITEMS=4 ENC_CPU_ITEMS=2 DEMO_CLIPS=24 DEMO_EPOCHS=2 OUT=/tmp/gpu_smoke \
#     bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/taemi_gpu}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-auto}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
: > "$OUT/steps.txt"

step() {  # step NAME LIMIT_S LOG COMMAND...: run with a time limit, log, record the status
  local name=$1 limit=$2 log=$3
  shift 3
  case " ${SKIP:-} " in *" $name "*) echo "$name skipped" | tee -a "$OUT/steps.txt"; return;; esac
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

runners=${RUNNERS:-"eager bf16 bf16_precast graphed_bf16 graphed_bf16_each_use graphed_fp32 plain"}
[ "$DEVICE" != cpu ] && [ -z "${RUNNERS:-}" ] && runners="$runners fp16 fp16_precast graphed_fp16 bf16_cudnn"
[ -n "${FULL:-}" ] && runners="$runners compiled compiled_fp16 compiled_bf16"
step throughput 300 throughput.txt $PY benchmarks/train_throughput.py --device "$DEVICE" --steps "${STEPS:-30}" \
  --warmup "${WARMUP:-3}" --presets ${PRESETS:-paper official} --runners $runners ${FULL:+--compile} \
  --profile "${PROFILE:-5}"

step throughput256 150 throughput256.txt $PY benchmarks/train_throughput.py --device "$DEVICE" \
  --steps "${STEPS:-30}" --warmup "${WARMUP:-3}" --batch-size "${BIG_BATCH:-256}" --no-flop-check \
  --presets $(echo ${PRESETS:-paper official} | cut -d' ' -f1) \
  --runners eager bf16 bf16_precast graphed_bf16 graphed_bf16_each_use --profile "${PROFILE:-5}"

step overhead 90 overhead.txt $PY benchmarks/step_overhead.py --device "$DEVICE" \
  --batch-size "${OVERHEAD_BATCH:-32}" --rounds "${OVERHEAD_ROUNDS:-7}" --presets ${PRESETS:-paper official}

work=$(mktemp -d)
step e2e 330 e2e_bench.txt $PY benchmarks/train_e2e.py --device "$DEVICE" --train-clips "${E2E_TRAIN:-8072}" \
  --valid-clips "${E2E_VALID:-1000}" --epochs "${E2E_EPOCHS:-4}" --preset "${E2E_PRESET:-paper}" \
  --workdir "$work/e2e" --no-warmup --json "$OUT/e2e_bench.json" \
  --variants default: fp32_eager:train.precision=fp32,train.cuda_graphs=off,data.resident=no,data.length_quantum=1
rm -rf "$work/e2e"

# exploratory, after the figures: compilation takes minutes of warm-up
for b in ${COMPILED_BATCHES:-256 32}; do
  step "compiled$b" 180 "compiled$b.txt" $PY benchmarks/train_throughput.py --device "$DEVICE" \
    --steps "${STEPS:-30}" --warmup "${WARMUP:-3}" --batch-size "$b" --no-flop-check \
    --presets $(echo ${PRESETS:-paper official} | cut -d' ' -f1) --runners graphed_bf16 graphed_bf16_compiled
done

step synth 120 synth.txt $PY -m taemi synth --out "$work/data" --clips "${CLIPS:-1500}" --no-progress
step train 240 e2e.txt $PY -m taemi train --store "$work/data/store" --train "$work/data/train.csv" \
  --valid "$work/data/valid.csv" --out "$work/run" --set train.max_epochs="${EPOCHS:-4}" \
  --set train.device="$DEVICE" --set train.precision="$PRECISION" --set data.num_workers=4 --no-progress
cp "$work/run/metrics.json" "$work/run/history.csv" "$work/run/config.yaml" "$OUT/" 2>/dev/null

# fine-tuning vs frozen-feature steps: offline backbones (real weights) and paper-size ones
# (random weights), gradient checkpointing on, batch FT_BATCH clips of 6.9 s.
step finetune 240 finetune.txt $PY benchmarks/finetune_throughput.py --device "$DEVICE" --precision "$PRECISION" \
  --batch-size "${FT_BATCH:-32}" --steps "${FT_STEPS:-10}" --gradient-checkpointing ${FT_ARGS:-}

# the extraction encoders on the device against the CPU (issue 15 item 6): the paper
# profile's architectures at real size with random weights in fp32 and fp16 (what
# `taemi extract --encoder-precision fp16` loads), and the packaged offline models where
# installed; ms per item, speed-ups and cosine with the CPU fp32 vectors.
step encoders 240 encoders.txt $PY benchmarks/encoders_device.py --device "$DEVICE" \
  --size "${ENC_SIZE:-real}" --items "${ENC_ITEMS:-64}" --cpu-items "${ENC_CPU_ITEMS:-8}" \
  --json "$OUT/encoders.json"

# extraction throughput on that machine and the main job: `taemi demo` generates talking-face
# clips, extracts them with the offline profile (its encoders run on the CPU: onnxruntime's CPU
# provider) and trains on the device; its summary holds the extraction's media seconds, wall
# seconds and per-stage seconds (needs the `extract` extra).
step demo 300 demo.txt $PY -m taemi demo --out "$work/demo" --clips "${DEMO_CLIPS:-160}" \
  --epochs "${DEMO_EPOCHS:-30}" --no-progress
cp "$work/demo/summary.json" "$OUT/demo_summary.json" 2>/dev/null
cp "$work/demo/features/extract_summary.json" "$OUT/demo_extract_summary.json" 2>/dev/null
echo "outputs in $OUT"; cat "$OUT/steps.txt"
