#!/usr/bin/env bash
# Issue 6's GPU figures in one call (one H100): box -> mask on a cached crop (decoder and whole
# engine path), encoder latency / throughput per variant, a kernel profile, torch.compile last.
# Then the CUDA-only tests (tests/test_gpu.py).
# Usage on the GPU machine: bash device/setup_gpu.sh && bash device/bench_gpu_speed.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-480}" python3 bench/bench_gpu.py --repeats 20 2>&1 | grep -v Warning | tee "$OUT/bench_gpu.md"
python3 -m pytest -q -o filterwarnings= -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 5 | tee "$OUT/test_gpu.txt"
