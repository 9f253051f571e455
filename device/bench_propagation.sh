#!/usr/bin/env bash
# 3D Dice and time per slice of box propagation (bench/bench_propagation.py) on the stardist wheel's
# 3D nuclei stack, default model and LiteMedSAM, on the GPU and on the device machine's CPU cores.
# The wheel (3 MB; only its two TIFFs are read, so any Python ABI does) travels in device_payload/
# (the machine has no network): before the run,
#   pip download stardist==0.9.2 --no-deps -d device_payload/stardist
# and carry device_payload/wheels, device_payload/stardist (and device_payload/init, which holds
# litemedsam.pth, if present; else LiteMedSAM is looked up by name and needs the network).
# Usage: bash device/setup_gpu.sh && bash device/bench_propagation.sh   (writes $OUT/bench_propagation_*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: the benches run from bench/
PY=${PY:-python3}
WHEEL=$(ls device_payload/stardist/stardist-*.whl | head -n 1)
LITEMEDSAM=$( [ -f device_payload/init/litemedsam.pth ] && echo ../device_payload/init/litemedsam.pth || echo litemedsam )
MODELS=${MODELS:-hrmedseg_sam_default=hrmedseg_sam_default litemedsam=$LITEMEDSAM}
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/lscpu.txt"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
cd bench
timeout 240 $PY bench_propagation.py --wheel "../$WHEEL" --device cuda $MODELS --json "$OUT/bench_propagation_gpu.json" | tail -n 40
CUDA_VISIBLE_DEVICES= timeout 300 $PY bench_propagation.py --wheel "../$WHEEL" --device cpu --threads 16 $MODELS --json "$OUT/bench_propagation_cpu16.json" | tail -n 40
