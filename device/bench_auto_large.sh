#!/usr/bin/env bash
# "Segment every object" on the 40000 x 40000 slide (bench/bench_auto_large.py): peak RSS and time
# on one GPU with 16 CPU threads (the 2 shared CPU cores of the dev machine only measure a small slide).
# Usage on the GPU machine: bash device/setup_gpu.sh && bash device/bench_auto_large.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}
timeout "${LIMIT:-540}" $PY bench/bench_auto_large.py --size "${SIZE:-40000}" --device cuda --threads 16 \
  --workdir "${WORKDIR:-/tmp/hrmedseg_bench}" --json "$OUT/bench_auto_large.json" 2>&1 | tail -n 25 | tee "$OUT/bench_auto_large.md"
