#!/usr/bin/env bash
# More training for the prompt-free nuclei model (issue 13, point 2: its foreground on stained,
# light-background tissue limits "segment every object"). Runs side by side on one GPU, each
# from INIT (default: the shipped hrmedseg_nuclei), each selecting its best epoch by val Dice on
# nuc_sel, a part of the *training* split held back from training (never the held-out split).
# RUNS: NAME:MANIFEST pairs; the manifests (device_payload/data_nuc, docs/benchmarks.md says how
# it was made) are nuc_fit (the training split less nuc_sel) and nuc_fit_light3 / _light5 (the
# same with every light-background image listed 3 / 5 times).
# Writes $OUT/nuclei_NAME.pt (float16 bundles) and the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_INSTALL:-}" ] || bash device/setup_gpu.sh
D=${DATA:-device_payload/data_nuc}; OUT=${OUT:-runs}; MINUTES=${MINUTES:-7}; mkdir -p "$OUT" runs
INIT=${INIT:-src/hrmedseg/weights/default/hrmedseg_nuclei.pt}; LR=${LR:-2e-4}
RUNS=${RUNS:-plain:nuc_fit light3:nuc_fit_light3}
run() {  # NAME MANIFEST
  python3 -m hrmedseg.training.cli finetune --model hrmedseg --init "$INIT" \
    --data "$D/$2" --val-data "$D/nuc_sel" --classes "nucleus:>=1" --img-size 1024 --scale 2 --batch-size 16 \
    --lr "$LR" --lr-decay 0.97 --epochs 400 --patience 400 --amp --num-workers 7 --time-limit-min "$MINUTES" \
    --out "runs/nuclei_$1.pt" --note "device/train_nuclei_light.sh $1: from $(basename "$INIT"), $2, lr $LR, selected on nuc_sel" \
    > "$OUT/nuclei_$1.txt" 2>&1
  python3 -c "from hrmedseg.weights.bundle import convert_bundle_dtype as c; c('runs/nuclei_$1.pt', '$OUT/nuclei_$1.pt')"
  cp "runs/nuclei_$1.log.csv" "$OUT/"
}
for spec in $RUNS; do run "${spec%%:*}" "${spec#*:}" & done
wait
grep -h "before training\|^done" "$OUT"/nuclei_*.txt
