#!/usr/bin/env bash
# The GPU tier in one go, for a CUDA machine with vpure installed:
#   bash benchmarks/gpu_tier.sh OUTDIR
# PyAV is not needed (the bench reads a folder of PNG frames); where diffusers, PyWavelets
# or tomli_w are missing (as on the lent H100/H200 images), install their wheels first.
# 1. `vpure bench` on the `modelscope` architecture (random weights, T=32 at 224x224): the
#    fp32 released-code reference vs fp16 and fp16 with CUDA graphs, 2. the tests marked
#    `gpu` (compiled Triton kernels vs the CPU implementations, CUDA-graph UNet replay),
#    3. the Triton warp-L1 benchmark. Fits a 10-minute slot. Every step runs even if an
#    earlier one fails; the exit status is the
#    number of failed steps. Figures append to OUTDIR/results.csv (the GPU's name is in the
#    `machine` column); copy the rows into benchmarks/results/results.csv.
set -u
out=${1:?usage: gpu_tier.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
step info 60 python3 -m vpure info
frames=$(mktemp -d)
step frames 60 python3 -c "
import cv2
from vpure.lab.bench_e2e import default_clip
clip = default_clip(32, 224)
for t in range(clip.shape[1]):
    rgb = (clip[:, t].permute(1, 2, 0).numpy() * 255).round().astype('uint8')
    cv2.imwrite(f'$frames/{t:04d}.png', rgb[..., ::-1])
print(clip.shape[1], 'frames in $frames')"
step bench_modelscope 300 python3 -m vpure bench --configs modelscope --backends torch --precisions fp32,fp16 --iters 3 \
  --video "$frames" --csv "$out/results.csv" --png "$out/stages_modelscope.png"
step gpu_tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests
step bench_warp_l1 90 python3 benchmarks/bench_warp_l1.py --csv "$out/results.csv"
exit "$failed"
