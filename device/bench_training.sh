#!/usr/bin/env bash
# One GPU: fine-tuning memory and images/s (HRMedSeg vs BasicUNet, 1024 px, batch 16) and
# distillation throughput with/without the teacher cache (random SAM ViT-B teacher).
# Needs monai (carried wheel). Results: $OUT/bench_training.{md,json}, $OUT/bench_distill.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}
$PY bench/bench_training.py --img-size 1024 --batch-size 16 --steps 10 --warmup 3 --json "$OUT/bench_training.json" | tee "$OUT/bench_training.md"
$PY bench/bench_distill.py --teacher random:vit_b --img-size 1024 --images 64 --batch-size 8 --amp 2>&1 \
  | tr '\r' '\n' | grep -v -E "^(distilling|teacher cache)" | tee "$OUT/bench_distill.md"
