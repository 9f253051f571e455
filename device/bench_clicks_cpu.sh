#!/usr/bin/env bash
# CPU time per click (box + clicks + the previous logits as mask prompt, on the cached crop) and,
# as the baseline in the same run, per box on the cached crop, for the default model and
# LiteMedSAM, on the device machine's CPU cores (the helpers' 2 shared cores give noisy figures).
# Uses the package's nuclei sample only: no held-out data travels. Writes $OUT/bench_clicks_cpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}
$PY -m pip install -q --no-index --no-deps device_payload/wheels/*.whl  # as device/setup_gpu.sh
$PY -m pip install -q --no-deps --no-build-isolation -e .
MODELS=${MODELS:-hrmedseg_sam_default=hrmedseg_sam_default litemedsam=litemedsam}
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/lscpu.txt"
for threads in ${THREADS:-2 8}; do
  CUDA_VISIBLE_DEVICES= $PY bench/bench_clicks.py $MODELS \
    --timing-only --max-objects 20 --threads "$threads" --json "$OUT/bench_clicks_cpu_t$threads.json"
done
