#!/usr/bin/env bash
# A shorter device/bench_batch_scaling.sh that fits one 10-minute device call: bench/bench_batch.py
# --part scaling on the first $LIMIT held-out DSB images, prompt-free nuclei (semantic), boxes and every object (auto), on
# CPU clusters of 1, 2, 4 and 8 workers and one GPU worker (each cluster started once, running
# every mode), against the old one-image-at-a-time loop (one process, CPU) measured first in the
# same run. Each row is printed (and logged to $OUT/bench_batch_scaling.log) as soon as it is
# measured, so a run cut short still leaves its rows. Estimated 6 min on the 16-core machine at 64
# images (not yet run; timeout 560 s).
# Usage: bash device/setup_gpu.sh && LIMIT=64 bash device/bench_batch_quick.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}; LIMIT=${LIMIT:-64}
VAL=${VAL:-device_payload/data/nuclei_val}
export PYTHONUNBUFFERED=1
lscpu | grep "Model name" | tee "$OUT/bench_batch_cpu.txt"
nproc | tee -a "$OUT/bench_batch_cpu.txt"
timeout "${BENCH_LIMIT:-560}" $PY bench/bench_batch.py --part scaling --modes ${MODES:-semantic boxes auto} --images "$VAL/images" --masks "$VAL/masks" \
  --limit "$LIMIT" --workers-list 1 2 4 8 --device cpu cuda --json "$OUT/bench_batch_scaling.json" 2>&1 \
  | grep -v "^ " | tee "$OUT/bench_batch_scaling.log"
