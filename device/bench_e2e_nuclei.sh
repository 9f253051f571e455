#!/usr/bin/env bash
# One GPU: fine-tune prompt-free HRMedSeg on the DSB 2018 train split for MINUTES (default 7) from
# random weights, then held-out whole-image Dice vs an Otsu threshold on the val split.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}
$PY bench/bench_training.py --e2e-train device_payload/data/nuclei_train --e2e-val device_payload/data/nuclei_val \
  --e2e-minutes "${MINUTES:-7}" --img-size 512 --batch-size 16 --amp --e2e-lr "${LR:-1e-4}" 2>&1 \
  | tr '\r' '\n' | grep -v -E "step/s|^fine-tuning" | tee "$OUT/bench_e2e_nuclei.md"
