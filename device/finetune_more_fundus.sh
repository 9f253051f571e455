#!/usr/bin/env bash
# A second round for the default box model (issue #19): continue from ft_both (device/finetune_litemedsam.sh)
# on the same training split with each fundus object repeated 8 times (the disc lagged the ellipse),
# at half the learning rate. Needs device_payload/init/ft_both.pt and
# device_payload/data/box_train_fundus_x8/manifest.json (the box_train items, fundus ones x8).
source "$(dirname "$0")/train_common.sh"
python3 -m pip install -q --no-index --no-deps device_payload/wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
mkdir -p runs
$PY -m hrmedseg.training.cli finetune --model hrmedseg-sam --init device_payload/init/ft_both.pt \
  --data "$DATA/box_train_fundus_x8" --out runs/ft_both2.pt --input-mode crop --img-size 1024 --scale 2 \
  --batch-size 16 --max-boxes 16 --lr "${LR:-5e-5}" --lr-decay 0.98 --epochs 400 --patience 400 --box-prior ellipse \
  --amp --num-workers "$WORKERS" --time-limit-min "$MINUTES" \
  --note "second round from ft_both, fundus objects x8 (device/finetune_more_fundus.sh)" $EXTRA 2>&1 \
  | tr '\r' '\n' | grep -v "step/s" > "$OUT_DIR/ft_both2.txt" || echo "ft_both2 failed"
$PY -c "from hrmedseg.weights.bundle import convert_bundle_dtype as c; c('runs/ft_both2.pt', '$OUT_DIR/ft_both2.pt')"
cp runs/ft_both2.log.csv "$OUT_DIR/"
grep "^done\|^before" "$OUT_DIR/ft_both2.txt"
