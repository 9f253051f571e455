#!/usr/bin/env bash
# One device call (< 10 min) for two open figures of issue 13: the first box on a reopened image
# from a warm disk embedding cache on a quiet CPU (bench_disk_cache.py, 2 and 16 threads), then
# "segment every object" on the 40000 x 40000 slide on the GPU (bench_auto_large.py: time, peak
# RSS; progress lines every 15 s, so a run cut by AUTO_LIMIT still says how far it got).
# Usage: bash device/setup_gpu.sh && bash device/bench_cache_auto.sh   (carry device_payload/wheels)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: the benches run from bench/
export PYTHONUNBUFFERED=1 HRMEDSEG_CACHE_DIR="$OUT/cache"
{ lscpu | grep -E "Model name|^CPU\(s\)"; date -u; uptime; } | tee "$OUT/cpu.txt"
for t in 2 16; do
  (cd bench && CUDA_VISIBLE_DEVICES= timeout 90 python3 bench_disk_cache.py --repeats 7 --threads $t --json "$OUT/disk_cache_t$t.json" 2>&1 | tail -n 12)
done
(cd bench && timeout "${AUTO_LIMIT:-420}" python3 bench_auto_large.py --size "${SIZE:-40000}" --device cuda --threads 16 \
  --workdir /tmp/hrmedseg_bench --json "$OUT/bench_auto_large.json" 2>&1 | tail -n 40 | tee "$OUT/bench_auto_large.txt")
date -u
