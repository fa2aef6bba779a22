#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one run (on a lent GPU machine with JAX and torch):
#   bash benchmarks/gpu_check.sh OUT_DIR
# Missing pure-Python packages may be carried as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" | tee -a "$out/gpu.txt"
n=0
run() {
  n=$((n + 1))
  timeout 200 python3 -m benchmarks.compare_torchvision --device gpu --json "$@" 2>"$out/err_$n.txt" \
      | tee -a "$out/results.jsonl"
}
run --what train --batch 8 --size 640 --precision bf16 --repeats 10
run --what infer --batch 1 --height 800 --width 1344 --precision bf16 --repeats 10
# The whole training loop (input pipeline included) of R50-FPN in bf16 on the shapes set at
# 512 px: images/s, loop overhead and MFU.
timeout 300 python3 -m benchmarks.train_loop --config experiments/smoke/shapes_demo.py \
    --set model.backbone=resnet50 --set model.norm=frozen_bn --set model.freeze_at=2 \
    --set model.fpn_channels=256 --set model.head_channels=256 --set model.head_convs=4 \
    --set model.dtype=bfloat16 --set data.image_size=512 --set data.min_size=512 \
    --set data.max_size=512 --set batch_size=16 --set data.num_workers=12 --steps 20 \
    2>"$out/err_loop.txt" | tee -a "$out/results.jsonl"
tail -n 5 "$out"/err_*.txt
