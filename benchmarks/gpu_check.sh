#!/usr/bin/env bash
# The GPU path in one script (issues 13 and 32), about 8 minutes on one H100; prints one table.
#   1. a 16-mixed training run (trainer=gpu) to the end, with the default callbacks and logger, on
#      each input path (data.decode=cpu, data.decode=gpu); then the recommended offline recipe
#      (experiment=offline_best: a frozen backbone, its feature cache)
#   2. ResNet-50 training images/s at batch 128 (16-mixed, channels_last) through the framework and
#      a plain loop, batches made on the device (data.decode=gpu), then on 8 CPU workers
#   3. raw ResNet-50 training and inference images/s at batch 128 (16-mixed, channels_last): the
#      table's `framework / raw step` row divides step 2's framework figure by this one
#   4. predict images/s (files -> CSV) against the raw forward, on the GPU; then 20,000 generated
#      640x480 JPEGs end to end, decoded on the GPU and on the CPU
#   5. ONNX export of the run's model, its parity check, and ONNX Runtime's providers
#
#   bash benchmarks/gpu_check.sh                # on a CUDA machine
#   QUICK=1 bash benchmarks/gpu_check.sh        # tiny sizes on whatever device there is (the tests)
#   SKIP="overhead backbones" bash benchmarks/gpu_check.sh   # leave out steps (their log names)
# Logs and the table (gpu_check.md) go to $GPU_CHECK_DIR (default outputs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_DIR:-outputs/gpu_check}
mkdir -p "$OUT"
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ACCEL=gpu; TRAINER=gpu; DEVICE=cuda
else
  ACCEL=cpu; TRAINER=default; DEVICE=cpu
  echo "no CUDA GPU here: every step runs on the CPU (only QUICK=1 makes sense)"
fi
if [ -n "${QUICK:-}" ]; then
  TRAIN=(model=resnet18 model.pretrained=false data.image_size=32 data.cache_size=40 trainer.max_epochs=1)
  OFFLINE=(experiment=offline_best data.image_size=64 data.cache_size=64 trainer.max_epochs=2)
  OVERHEAD=(--quick --accelerator "$ACCEL")
  BACKBONES=(--quick)
  PREDICT=(--quick --device "$DEVICE")
  MANY=(--quick --generate 64 --device "$DEVICE" --decode gpu,cpu --no-formats)
else
  TRAIN=(model=efficientnet_lite0 trainer.max_epochs=3)
  OFFLINE=(experiment=offline_best)
  OVERHEAD=(--accelerator "$ACCEL" --backbone resnet50 --batch-size 128 --synthetic 1024 --epochs 3
            --repeats 2 --num-workers 8)
  BACKBONES=(--backbones resnet50 --batch-size 128 --steps 10 --repeats 2)
  PREDICT=(--repeats 2 --batch-size 64 --device "$DEVICE")
  MANY=(--generate 20000 --batch-size 256 --repeats 1 --device "$DEVICE" --decode gpu,cpu --no-formats)
fi

step() {  # step NAME COMMAND...: run it, keep its output in $OUT/NAME.log, note failures
  local name=$1; shift
  if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "== $name: skipped (SKIP)"; return; fi
  echo "== $name: $*"
  if ! "$@" > "$OUT/$name.log" 2>&1; then
    echo "$name FAILED (see $OUT/$name.log)"; tail -5 "$OUT/$name.log"
  fi
}

step train $PY -m railway_defect.train trainer=$TRAINER "${TRAIN[@]}" data.decode=cpu "hydra.run.dir=$OUT/train"
step train_device $PY -m railway_defect.train trainer=$TRAINER "${TRAIN[@]}" data.decode=gpu \
  "hydra.run.dir=$OUT/train_device"
step offline_best $PY -m railway_defect.train trainer=$TRAINER "${OFFLINE[@]}" "hydra.run.dir=$OUT/offline_best"
step overhead $PY benchmarks/bench_overhead.py "${OVERHEAD[@]}" --decode gpu
step overhead_cpu $PY benchmarks/bench_overhead.py "${OVERHEAD[@]}" --decode cpu --repeats 1
step backbones $PY benchmarks/bench_backbones.py "${BACKBONES[@]}"
step predict $PY benchmarks/bench_predict.py "${PREDICT[@]}"
step predict_many $PY benchmarks/bench_predict.py "${MANY[@]}"
step export $PY -m railway_defect.export "ckpt_path=$OUT/train" format=onnx "output=$OUT/model.onnx"
$PY -c "import onnxruntime as ort; print('providers:', ort.get_available_providers())" >> "$OUT/export.log" 2>&1
$PY benchmarks/gpu_check_table.py "$OUT" | tee "$OUT/gpu_check.md"
