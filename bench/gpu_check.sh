#!/usr/bin/env bash
# One call on a GPU machine: install, check correctness on CUDA, run the full benchmarks.
# Results go under $OUT (default bench/results/gpu-run); copy them into bench/results/.
# The machine has no network: install without dependencies or build isolation.
# SECTIONS (default "feature_loss,attention,teacher") picks the parts; each part fits a 10-minute
# command (about 7 min worst case); with a per-command time limit, run them one per call:
#   SECTIONS=feature_loss bash bench/gpu_check.sh; SECTIONS=attention ...; SECTIONS=teacher ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-run}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
status=0
SECTIONS="${SECTIONS:-feature_loss,attention,teacher}"
DEVICE=$(python -c "import torch; print(''.join(c if c.isalnum() else '-' for c in torch.cuda.get_device_name().lower()))")
if [[ ",$SECTIONS," == *",feature_loss,"* ]]; then
timeout 180 python bench/gpu_check.py feature_loss token_mse > "$OUT/gpu_check.txt" 2>&1 || status=1
tail -3 "$OUT/gpu_check.txt"
grep FAIL "$OUT/gpu_check.txt" | head -20
timeout 240 python bench/bench_feature_loss.py --out "$OUT/feature_loss-$DEVICE.csv" 2>&1 | tee "$OUT/bench_feature_loss.txt" | tail -30
fi
# Teacher attention: correctness on CUDA (float64 reference), kernel shapes, whole truncated teacher.
if [[ ",$SECTIONS," == *",attention,"* ]]; then
timeout 240 python bench/gpu_check.py attention > "$OUT/gpu_check_attention.txt" 2>&1 || status=1
tail -3 "$OUT/gpu_check_attention.txt"
grep FAIL "$OUT/gpu_check_attention.txt" | head -20
timeout 240 python bench/bench_attention.py --out "$OUT/attention-$DEVICE.csv" 2>&1 | tee "$OUT/bench_attention.txt" | tail -30
fi
# Whole truncated-teacher forward (ViT-g/14 reg4, B=128, k=10/20/40) with and without the kernel.
if [[ ",$SECTIONS," == *",teacher,"* ]]; then
timeout 360 python bench/bench_attention.py --teacher --out "$OUT/attention-teacher-$DEVICE.csv" 2>&1 | tee "$OUT/bench_attention_teacher.txt" | tail -12
fi
exit $status
