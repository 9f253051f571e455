#!/usr/bin/env bash
# Every one-GPU figure of the benchmarks in one run (each step time-boxed so one slow step cannot
# take the others down): encoder/decoder speed (bench_gpu.py), fine-tuning memory vs BasicUNet and
# distillation throughput (device/bench_training.sh), box engine boxes/s (bench_engine.py).
# Writes $OUT/*.md / *.json. Usage on the GPU machine: bash device/setup_gpu.sh && bash device/run_gpu_benchmarks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 240 python3 bench/bench_gpu.py --repeats 20 2>&1 | grep -v Warning | tee "$OUT/bench_gpu.md"
OUT=$OUT timeout 200 bash device/bench_training.sh > /dev/null 2>&1; tail -n 30 "$OUT/bench_training.md" "$OUT/bench_distill.md"
timeout 100 python3 bench/bench_engine.py --device cuda --threads 16 --no-baseline --json "$OUT/bench_engine_gpu.json" 2>&1 | tail -n 25 | tee "$OUT/bench_engine_gpu.md"
