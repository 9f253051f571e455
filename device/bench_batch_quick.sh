#!/usr/bin/env bash
# A shorter device/bench_batch_scaling.sh that fits one 10-minute device call: the same benches
# (bench/bench_batch.py) on the first --limit held-out DSB images, prompt-free nuclei (auto) and boxes,
# 1/2/4/8 CPU workers and one GPU worker. Each row reports start-up (cluster, model loads) apart from
# steady images/s (all workers up, models loaded) and wall time. Fits one device call (< 9 min).
# Usage: bash device/setup_gpu.sh && LIMIT=64 bash device/bench_batch_quick.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}; LIMIT=${LIMIT:-64}
VAL=${VAL:-device_payload/data/nuclei_val}
lscpu | grep "Model name" | tee "$OUT/bench_batch_cpu.txt"
for MODE in auto boxes; do
  timeout 200 $PY bench/bench_batch.py --part scaling --mode "$MODE" --images "$VAL/images" --masks "$VAL/masks" \
    --limit "$LIMIT" --workers-list 1 2 4 8 --device cpu --json "$OUT/bench_batch_scaling_${MODE}_cpu.json" 2>&1 | tail -n 25
  timeout 60 $PY bench/bench_batch.py --part scaling --mode "$MODE" --images "$VAL/images" --masks "$VAL/masks" \
    --limit "$LIMIT" --workers-list 1 --device cuda --json "$OUT/bench_batch_scaling_${MODE}_gpu1.json" 2>&1 | tail -n 12
done
