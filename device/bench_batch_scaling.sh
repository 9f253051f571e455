#!/usr/bin/env bash
# 16-core device machine: hrmedseg batch images/s for 1, 2, 4 and 8 CPU workers and for one GPU
# worker, prompt-free nuclei (--mode auto) and boxes (the masks' objects) on the DSB 2018 held-out
# split (device_payload/data/nuclei_val, made by scripts/prepare_device_payload.py), against the old
# one-image-at-a-time loop (hrmedseg segment per image) measured in the same run; plus the
# 40000 x 40000 slide with 100 boxes in region tasks (worker peak RSS, label write time).
# Writes $OUT/bench_batch_*.json. Usage: bash device/setup_gpu.sh && bash device/bench_batch_scaling.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}
VAL=device_payload/data/nuclei_val
$PY -c "import distributed, ome_zarr" || { echo "distributed / ome-zarr missing: rerun scripts/prepare_device_payload.py (its WHEELS list them) and device/setup_gpu.sh"; exit 2; }
lscpu | grep "Model name" | tee "$OUT/bench_batch_cpu.txt"
for MODE in auto boxes; do
  timeout 900 $PY bench/bench_batch.py --part scaling --mode "$MODE" --images "$VAL/images" --masks "$VAL/masks" \
    --workers-list 1 2 4 8 --device cpu --json "$OUT/bench_batch_scaling_${MODE}_cpu.json" 2>&1 | tail -n 40
  timeout 600 $PY bench/bench_batch.py --part scaling --mode "$MODE" --images "$VAL/images" --masks "$VAL/masks" \
    --workers-list 1 --device cuda --json "$OUT/bench_batch_scaling_${MODE}_gpu1.json" 2>&1 | tail -n 20
done
timeout 900 $PY bench/bench_batch.py --part slide --workers 4 --device cpu --workdir /tmp/hrmedseg_bench \
  --json "$OUT/bench_batch_slide.json" 2>&1 | tail -n 20
timeout 300 $PY bench/bench_batch.py --part write --workdir /tmp/hrmedseg_bench --json "$OUT/bench_batch_write.json" 2>&1 | tail -n 12
