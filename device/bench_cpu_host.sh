#!/usr/bin/env bash
# Issue 20's CPU figures on the device machine's host CPU (no GPU used), at 2 and 16 threads:
# the measured backend choice (hrmedseg info, calibration JSON), the encoder against the
# authors' LGViT + neck (bench_encoder.py), and the box engine on 200 nucleus boxes of a
# 2048^2 image under the "auto" default and each backend (bench_engine.py, JSON).
# Usage on the device machine: bash device/setup_gpu.sh && [THREADS="16"] bash device/bench_cpu_host.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES="" PYTHONUNBUFFERED=1 HRMEDSEG_CACHE_DIR="$OUT/cache"
{ lscpu | grep -E "Model name|^CPU\(s\)|Flags" ; date -u; } > "$OUT/cpu.txt"
for t in ${THREADS:-2 16}; do
  OMP_NUM_THREADS=$t timeout 120 python3 -m hrmedseg.cli info 2>&1 | grep -v Warning | tee "$OUT/info_t$t.txt"
  timeout 200 python3 bench/bench_encoder.py --threads "$t" --repeats 7 --no-mobilesam 2>&1 | grep -v Warning | tee "$OUT/encoder_t$t.md"
  OMP_NUM_THREADS=$t timeout 300 python3 bench/bench_engine.py --threads "$t" --no-baseline \
    --backends fast,fast-bf16 --repeats 2 --json "$OUT/engine_t$t.json" > /dev/null 2>"$OUT/engine_t$t.err"
done
