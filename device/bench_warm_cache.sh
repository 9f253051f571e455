#!/usr/bin/env bash
# Issue 13 point 3 on the device machine's host CPU (GPU unused): the first box on a reopened
# image with a warm disk cache (bench/bench_disk_cache.py --parts), from a BASE tree's sources and
# this checkout's, alternately, ROUNDS rounds (default 3) at each of THREADS (default "2 16").
# BASE: `git archive <commit> src bench` unpacked without the weights (*.pt); the checkout's
# weights are linked in (they are the same files).
# Usage: bash device/setup_gpu.sh && BASE=device_payload/basece2 bash device/bench_warm_cache.sh
#   (carry device_payload/wheels and the BASE folder)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
BASE=$(cd "${BASE:?BASE: the base commit\'s unpacked src and bench}" && pwd)
export CUDA_VISIBLE_DEVICES="" PYTHONUNBUFFERED=1
for f in src/hrmedseg/weights/default/*.pt; do [ -f "$BASE/$f" ] && [ ! -L "$BASE/$f" ] || ln -sfn "$PWD/$f" "$BASE/$f"; done
{ lscpu | grep -E "Model name|^CPU\(s\)"; uptime; date -u; } | tee "$OUT/cpu.txt"
for t in ${THREADS:-2 16}; do for r in $(seq "${ROUNDS:-3}"); do for tree in "$BASE" "$PWD"; do
  json="$OUT/warm_$(basename "$tree")_t${t}_r$r.json"
  PYTHONPATH="$tree/src:$tree/bench" OMP_NUM_THREADS=$t timeout 150 python3 "$tree/bench/bench_disk_cache.py" \
    --repeats 7 --threads "$t" --parts --json "$json" > "${json%.json}.txt" 2>&1
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], {k: v for k, v in r.items() if k.endswith('_ms')})" \
    "$json" "$(basename "$tree") threads $t round $r" || tail -n 5 "${json%.json}.txt"
done; done; done
