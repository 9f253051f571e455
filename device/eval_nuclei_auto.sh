#!/usr/bin/env bash
# bench/eval_auto.py (segment_auto and its proposals, same box model) for the shipped
# hrmedseg_nuclei (with the Otsu + watershed baseline) and each model file given, one process
# each, in parallel on the GPU (THREADS CPU threads each), on two image sets of
# device_payload/data_nuc: the held-out DSB images (shared/) and nuc_sel (sel_shared/: training
# images that no training run saw, the set to choose a model on).
# Usage: bash device/eval_nuclei_auto.sh MODEL.pt [MODEL.pt ...]; writes $OUT/eval_{val,sel}_*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_INSTALL:-}" ] || bash device/setup_gpu.sh
D=${DATA:-device_payload/data_nuc}; OUT=${OUT:-runs}; THREADS=${THREADS:-2}; mkdir -p "$OUT"
export OMP_NUM_THREADS=$THREADS
one() {  # SET LABEL PROPOSER METHODS
  local shared=$D/shared split=val
  [ "$1" = sel ] && shared=$D/sel_shared split=train
  HRMEDSEG_SHARED_DATA=$shared python3 bench/eval_auto.py --device cuda --split $split --proposer "$3" --methods "$4" \
    --json "$OUT/eval_$1_$2.json" > "$OUT/eval_$1_$2.txt" 2> "$OUT/eval_$1_$2.err"
}
for set in val sel; do
  one $set shipped nuclei auto,proposals,watershed &
  for model in "$@"; do one $set "$(basename "$model" .pt)" "$model" auto,proposals & done
done
wait
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("eval_*.json")):
    r = json.loads(f.read_text())
    for m in ("auto", "proposals", "watershed"):
        if m in r:
            print(f.stem, m, "pooled F1 %.3f" % r[m]["f1_pooled"], {k: round(r[m][k]["f1_pooled"], 3) for k in ("dark", "light") if k in r[m]},
                  "dice %.3f" % r[m]["matched_dice"], "s/img %.2f" % r[m]["seconds_per_image"])
PY
