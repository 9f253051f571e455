#!/usr/bin/env bash
# Box fine-tuning of the LiteMedSAM-distilled HRMedSegSAM on the lent GPU (issue #19), three runs in
# one call: both datasets (the candidate default) in one stream, and, for the forgetting figures,
# nuclei only then fundus only in a second stream sharing the GPU. Needs
# `python scripts/prepare_device_payload.py --finetune-compact` and the zero-shot bundle (float16)
# in device_payload/init/zeroshot.pt. Validation for the best checkpoint is 15% of the training
# split: the held-out split never travels. Writes float16 bundles and logs to $OUT.
source "$(dirname "$0")/train_common.sh"
python3 -m pip install -q --no-index --no-deps device_payload/wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
MINUTES_BOTH=${MINUTES_BOTH:-7} MINUTES_ONE=${MINUTES_ONE:-3.3}
W=$(( WORKERS / 2 ))
run() {  # name minutes data
  $PY -m hrmedseg.training.cli finetune --model hrmedseg-sam --init device_payload/init/zeroshot.pt \
    --data "$DATA/$3" --out "runs/$1.pt" --input-mode crop --img-size 1024 --scale 2 --batch-size 16 \
    --max-boxes 16 --lr "${LR:-1e-4}" --lr-decay 0.98 --epochs 400 --patience 400 --box-prior ellipse --amp \
    --num-workers "$W" --time-limit-min "$2" \
    --note "fine-tuned from the LiteMedSAM-distilled HRMedSegSAM on $3 (device/finetune_litemedsam.sh)" $EXTRA \
    > "runs/$1.txt" 2>&1 || echo "$1 failed"
  $PY -c "from hrmedseg.weights.bundle import convert_bundle_dtype as c; c('runs/$1.pt', '$OUT_DIR/$1.pt')"
  cp "runs/$1.log.csv" "$OUT_DIR/"
}
mkdir -p runs
start=$(date +%s)
run ft_both "$MINUTES_BOTH" box_train &
( run ft_nuclei "$MINUTES_ONE" box_train_nuclei; run ft_fundus "$MINUTES_ONE" box_train_fundus ) &
wait
echo "fine-tuning call: $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,memory.used --format=csv || true
for f in runs/ft_*.txt; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v "step/s"; done > "$OUT_DIR/finetune.txt"
grep -h "^done" runs/ft_*.txt
ls -la "$OUT_DIR"
