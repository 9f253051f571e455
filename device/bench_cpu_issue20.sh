#!/usr/bin/env bash
# Issue 20's targets on the device machine's host CPU (GPU unused), in one call (< 8 min):
# the encoder against the authors' LGViT + neck, eager and AOT-compiled (bench_encoder.py --aot),
# at 2 and 16 threads; segment() of the 200 nucleus boxes and the first box on a new region
# (bench_engine.py --no-baseline) from issue 20's starting point's sources (BASE: a `git archive
# 926f6d2 src/hrmedseg bench` unpacked there) and this checkout's, alternately, each tree's own
# bench script; and issue 13's first box with a warm disk cache (bench_disk_cache.py, 2 threads).
# This checkout also runs with HRMEDSEG_MALLOC_TUNING=0 (the engine's malloc settings off) as a
# same-run baseline (UNTUNED=0 leaves that out). SKIP_ENCODER=1 leaves out the encoder part,
# SKIP_DISK_CACHE=1 the warm-cache part; PREV=<tree> adds another tree (e.g. main before a change)
# to each round; ENGINE_THREADS (default "2 16") and ROUNDS (default 2) set the engine runs.
# Usage: bash device/setup_gpu.sh && bash device/bench_cpu_issue20.sh  (carry device_payload/wheels, device_payload/base926)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
BASE=${BASE:-device_payload/base926}
export CUDA_VISIBLE_DEVICES="" PYTHONUNBUFFERED=1 HRMEDSEG_CACHE_DIR="$OUT/cache"
{ lscpu | grep -E "Model name|^CPU\(s\)|Flags"; date -u; } > "$OUT/cpu.txt"
grep "Model name" "$OUT/cpu.txt"
[ -n "${SKIP_ENCODER:-}" ] || for t in ${THREADS:-2 16}; do
  timeout 240 python3 bench/bench_encoder.py --threads "$t" --repeats 7 --no-mobilesam --aot 2>&1 | grep -v Warning > "$OUT/encoder_t$t.md"
  grep -E "reference|bf16" "$OUT/encoder_t$t.md" | sed "s/^/threads $t: /"
done
engine() {  # TREE THREADS ROUND [TAG]: TAG names the run (default: the tree's folder name)
  local tag=${4:-$(basename "$1")} json
  json="$OUT/engine_${tag}_t$2_r$3.json"
  PYTHONPATH="$1/src:$1/bench" OMP_NUM_THREADS=$2 timeout 120 python3 "$1/bench/bench_engine.py" --threads "$2" --no-baseline \
    --json "$json" > "${json%.json}.txt" 2>&1
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); s = r['segment_all']; print(sys.argv[2], 'encoder', r['encoder_alone_s'], 'first box', r['first_box_new_region_s'], '200 boxes', s['total_s'], s['encoder_calls'], s['decoder_calls'])" \
    "$json" "$tag threads $2 round $3"
}
for t in ${ENGINE_THREADS:-2 16}; do for r in $(seq 1 "${ROUNDS:-2}"); do
  engine "$PWD/$BASE" $t $r
  [ -z "${PREV:-}" ] || engine "$PWD/$PREV" $t $r prev
  [ "${UNTUNED:-1}" = 0 ] || HRMEDSEG_MALLOC_TUNING=0 engine "$PWD" $t $r untuned
  engine "$PWD" $t $r
done; done
[ -n "${SKIP_DISK_CACHE:-}" ] || timeout 120 python3 bench/bench_disk_cache.py --repeats 7 --threads 2 --json "$OUT/disk_cache_t2.json" 2>&1 | tail -n 8
