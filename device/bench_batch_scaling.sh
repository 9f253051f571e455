#!/usr/bin/env bash
# 16-core device machine: hrmedseg batch images/s for 1, 2, 4 and 8 CPU workers and for one GPU
# worker, prompt-free nuclei (semantic), boxes (the masks' objects) and every object (auto) on the DSB 2018 held-out split
# (device_payload/data/nuclei_val, made by scripts/prepare_device_payload.py), against the old
# one-image-at-a-time loop (hrmedseg segment per image) measured in the same run; each cluster is
# started once and runs every mode, and rows are printed as they are measured. Then the
# 40000 x 40000 slide with 100 boxes in region tasks (worker peak RSS, label write time) and the
# label writers. Writes $OUT/bench_batch_*.json and logs. More than one 10-minute device call:
# device/bench_batch_quick.sh is the scaling part alone.
# Usage: bash device/setup_gpu.sh && bash device/bench_batch_scaling.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}
VAL=device_payload/data/nuclei_val
export PYTHONUNBUFFERED=1
$PY -c "import distributed, ome_zarr" || { echo "distributed / ome-zarr missing: rerun scripts/prepare_device_payload.py (its WHEELS list them) and device/setup_gpu.sh"; exit 2; }
lscpu | grep "Model name" | tee "$OUT/bench_batch_cpu.txt"
timeout 900 $PY bench/bench_batch.py --part scaling --modes ${MODES:-semantic boxes auto} --images "$VAL/images" --masks "$VAL/masks" \
  --limit 1000 --workers-list 1 2 4 8 --device cpu cuda --json "$OUT/bench_batch_scaling.json" 2>&1 \
  | grep -v "^ " | tee "$OUT/bench_batch_scaling.log"
timeout 900 $PY bench/bench_batch.py --part slide --workers 4 --device cpu --workdir /tmp/hrmedseg_bench \
  --json "$OUT/bench_batch_slide.json" 2>&1 | tail -n 20
timeout 300 $PY bench/bench_batch.py --part write --workdir /tmp/hrmedseg_bench --json "$OUT/bench_batch_write.json" 2>&1 | tail -n 12
