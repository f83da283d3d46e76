#!/bin/bash
# The GPU figures docs/scale.md plans with, in one command (on a machine with CUDA and the shared data beside the
# checkout):
#
#   bench/gpu.sh [OUT_DIR]        # default: bench-gpu-<date>
#
# Writes OUT_DIR/teachers.{json,log} (teacher frames/s, batches 64 and 256, and the time split per frame),
# OUT_DIR/train.{json,log} (training clips/s at batch 64, eager and with --compile) and OUT_DIR/nvidia-smi.txt.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-bench-gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true

python "$here/teachers.py" --device cuda --json "$out/teachers.json" 2>&1 | tee "$out/teachers.log"
python "$here/train.py" --device cuda --json "$out/train.json" 2>&1 | tee "$out/train.log"
python "$here/train.py" --device cuda --compile --json "$out/train-compile.json" 2>&1 | tee "$out/train-compile.log"
echo "results in $out"
