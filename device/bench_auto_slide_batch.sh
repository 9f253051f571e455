#!/usr/bin/env bash
# "Segment every object" (issue 13) on the 40000 x 40000 slide through `hrmedseg batch --auto`
# (issue 14): bench/bench_auto_large.py --workers, an embedded LocalCluster of $WORKERS worker
# processes on the 16-core machine, each running its models on $DEVICE (default cuda: the one GPU
# shared by every worker; the watershed split and the crop work run on each worker's CPU core),
# cell tasks of $REGION px. Reports slide-making time, wall time, objects, label write time and
# the peak RSS of each worker and of the client.
# Usage: bash device/setup_gpu.sh && bash device/bench_auto_slide_batch.sh   (carry device_payload/wheels)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
lscpu | grep "Model name" | tee "$OUT/cpu.txt"; nproc | tee -a "$OUT/cpu.txt"
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$OUT/cpu.txt"
timeout "${LIMIT:-560}" $PY bench/bench_auto_large.py --size "${SIZE:-40000}" --device "${DEVICE:-cuda}" --workers "${WORKERS:-16}" \
  --region-size "${REGION:-4096}" --workdir "${WORKDIR:-/tmp/hrmedseg_bench}" --json "$OUT/bench_auto_slide_batch.json" 2>&1 \
  | tr '\r' '\n' | grep -v "^ *$" > "$OUT/bench_auto_slide_batch.log"
tail -n 40 "$OUT/bench_auto_slide_batch.log"
