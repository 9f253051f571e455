#!/usr/bin/env bash
# One device call (< 9 min) of the CPU / GPU figures still open after the helpers' work:
# propagation's 3D Dice and time per slice (GPU and 16 CPU threads, default model; #16), the first
# box on a new region with its breakdown, old sources (BASE_SRC, e.g. `git archive <commit> src/hrmedseg`
# unpacked into device_payload/base_src) and new alternately (#20), and CPU time per click against a
# cached box (#13). Usage: bash device/setup_gpu.sh && bash device/bench_cpu_quick.sh
# (carry device_payload/wheels, device_payload/stardist, device_payload/base_src).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: the benches run from bench/
export PYTHONUNBUFFERED=1 HRMEDSEG_CACHE_DIR="$OUT/cache"
BASE_SRC=${BASE_SRC:-device_payload/base_src/src}
{ lscpu | grep -E "Model name|^CPU\(s\)|Flags"; date -u; } > "$OUT/cpu.txt"
WHEEL=$(ls device_payload/stardist/stardist-*.whl | head -n 1)
(cd bench && timeout 150 python3 bench_propagation.py --wheel "../$WHEEL" --device cuda hrmedseg_sam_default=hrmedseg_sam_default \
  --json "$OUT/bench_propagation_gpu.json" 2>&1 | tail -n 30)
(cd bench && CUDA_VISIBLE_DEVICES= timeout 150 python3 bench_propagation.py --wheel "../$WHEEL" --device cpu --threads 16 \
  hrmedseg_sam_default=hrmedseg_sam_default --json "$OUT/bench_propagation_cpu16.json" 2>&1 | tail -n 30)
for t in 2 16; do
  for round in 1 2; do
    for src in "$BASE_SRC" src; do
      CUDA_VISIBLE_DEVICES= THREADS=$t PYTHONPATH="$src:bench" timeout 60 python3 bench/bench_first_box.py 2>&1 | tail -n 1 | sed "s/^/threads $t: /" | tee -a "$OUT/first_box.txt"
    done
  done
done
CUDA_VISIBLE_DEVICES= timeout 90 python3 bench/bench_clicks.py hrmedseg_sam_default=hrmedseg_sam_default \
  --timing-only --max-objects 20 --threads 2 --json "$OUT/bench_clicks_cpu_t2.json" 2>&1 | tail -n 15
