#!/usr/bin/env bash
# 3D Dice and time per slice of box propagation (bench/bench_propagation.py), default model and
# LiteMedSAM, on the GPU and on the device machine's CPU cores, on one of two stacks (DATASET):
#   stardist (default): the stardist wheel's synthetic 3D nuclei stack. Before the run:
#     pip download stardist==0.9.2 --no-deps -d device_payload/stardist
#   mni152: the MNI ICBM152 2009a T1 template in the nilearn wheel (real MRI, an average of 152
#     scans), hemispheres as objects (OBJECTS), sliced along AXIS (default axial), every STEP-th
#     slice (default 1). nibabel must be installed (it is in scripts/prepare_device_payload.py's
#     WHEELS). Before the run:
#     pip download nilearn==0.14.1 --no-deps -d device_payload/nilearn
# The wheels are read as zips (only their data files), so any Python ABI does; they travel in
# device_payload/ (the machine has no network): carry device_payload/wheels and
# device_payload/stardist or device_payload/nilearn (and device_payload/init, which holds
# litemedsam.pth, if present; else LiteMedSAM is looked up by name and needs the network).
# WHEEL overrides the wheel's path (relative to the repository root or absolute).
# Usage: bash device/setup_gpu.sh && DATASET=mni152 AXIS=coronal bash device/bench_propagation.sh
#   (writes $OUT/bench_propagation_{gpu,cpu16}[_mni152_AXIS].json)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: the benches run from bench/
PY=${PY:-python3}
DATASET=${DATASET:-stardist}
case "$DATASET" in
  stardist) WHEEL=${WHEEL:-$(ls device_payload/stardist/stardist-*.whl | head -n 1)}; ARGS=(); TAG="" ;;
  mni152) WHEEL=${WHEEL:-$(ls device_payload/nilearn/nilearn-*.whl | head -n 1)}
          ARGS=(--dataset mni152 --axis "${AXIS:-axial}" --objects "${OBJECTS:-hemispheres}" --step "${STEP:-1}" --no-rules-before)
          TAG="_mni152_${AXIS:-axial}" ;;
  *) echo "DATASET must be stardist or mni152, not $DATASET" >&2; exit 2 ;;
esac
WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")  # absolute: the benches run from bench/
LITEMEDSAM=$( [ -f device_payload/init/litemedsam.pth ] && echo ../device_payload/init/litemedsam.pth || echo litemedsam )
MODELS=${MODELS:-hrmedseg_sam_default=hrmedseg_sam_default litemedsam=$LITEMEDSAM}
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/lscpu.txt"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
cd bench
timeout ${GPU_TIMEOUT:-240} $PY bench_propagation.py --wheel "$WHEEL" "${ARGS[@]}" --device cuda $MODELS --json "$OUT/bench_propagation_gpu$TAG.json" | tail -n 40
CUDA_VISIBLE_DEVICES= timeout ${CPU_TIMEOUT:-300} $PY bench_propagation.py --wheel "$WHEEL" "${ARGS[@]}" --device cpu --threads 16 $MODELS --json "$OUT/bench_propagation_cpu16$TAG.json" | tail -n 40
