#!/usr/bin/env bash
# Click fine-tuning of the default box model (issue #13) on the lent GPU, then the click benchmark
# on the held-out split, in one call (< 9 min): `hrmedseg.training finetune --clicks 8` (SAM's
# interactive recipe, training/clicks.py) from hrmedseg_sam_default on the nuclei + fundus training
# split (box_train), then bench/bench_clicks.py (box, 1, 3, 5 clicks) for the new model, the old
# default and LiteMedSAM on the held-out images (is_val) of the payload.
# Needs `python scripts/prepare_device_payload.py` (data/{nuclei,fundus}_{train,val}, box_train,
# splits.json, wheels); starts from the shipped default bundle (src/hrmedseg/weights/default/);
# LiteMedSAM from device_payload/init/litemedsam.pth (the machine has no network), else its registry name.
# Held-out fundus images are the payload's (1024 px long side), not native resolution.
# Local smoke test (CPU, 2 images, 1 step): see docs/training.md.
# Writes $OUT/ft_clicks.pt (float16), its log, finetune_clicks.txt and bench_clicks.json.
source "$(dirname "$0")/train_common.sh"
if [ -z "${SKIP_INSTALL:-}" ]; then  # as device/setup_gpu.sh; SKIP_INSTALL=1 for a local smoke test
  python3 -m pip install -q --no-index --no-deps device_payload/wheels/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e .
fi
MINUTES=${MINUTES:-5.5} CLICKS=${CLICKS:-8} IMAGES=${IMAGES:-16} MAX_OBJECTS=${MAX_OBJECTS:-10}
DEVICE=${DEVICE:-cuda} INIT=${INIT:-src/hrmedseg/weights/default/hrmedseg_sam_default.pt}
LITEMEDSAM=${LITEMEDSAM:-$( [ -f device_payload/init/litemedsam.pth ] && echo device_payload/init/litemedsam.pth || echo litemedsam )}
mkdir -p runs
start=$(date +%s)
$PY -m hrmedseg.training.cli finetune --model hrmedseg-sam --init "$INIT" --data "$DATA/box_train" \
  --out runs/ft_clicks.pt --input-mode crop --img-size 1024 --scale 2 --batch-size "${BATCH:-8}" --max-boxes "${BOXES:-8}" \
  --clicks "$CLICKS" --click-mask-only 2 --lr "${LR:-5e-5}" --lr-decay 0.98 --epochs 400 --patience 400 --amp \
  --num-workers "$WORKERS" --time-limit-min "$MINUTES" --device "$DEVICE" \
  --note "click fine-tuning (--clicks $CLICKS) from hrmedseg_sam_default on box_train (device/finetune_clicks.sh)" $EXTRA 2>&1 \
  | tr '\r' '\n' | grep -v "step/s" > "$OUT_DIR/finetune_clicks.txt" || echo "ft_clicks failed"
grep "^done\|^before\|^epoch" "$OUT_DIR/finetune_clicks.txt" | tail -5
echo "fine-tuning: $(( $(date +%s) - start )) s"
$PY -c "from hrmedseg.weights.bundle import convert_bundle_dtype as c; c('runs/ft_clicks.pt', '$OUT_DIR/ft_clicks.pt')"
cp runs/ft_clicks.log.csv "$OUT_DIR/"
# The held-out split as bench/bench_clicks.py reads it (manifests over the payload's *_val folders).
$PY - "$DATA" runs/heldout <<'PY'
import json, sys
from pathlib import Path
data, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
splits = json.loads((data / "splits.json").read_text())
for dataset, part, ext in (("nuclei_dsb2018", "nuclei", ".png"), ("fundus_drishtigs", "fundus", ".jpg")):
    (out / dataset).mkdir(parents=True, exist_ok=True)
    items = [{"name": n, "image": str(data / f"{part}_val/images/{n}{ext}"), "mask": str(data / f"{part}_val/masks/{n}.png")}
             for n in splits[part]["val"]]
    (out / dataset / "manifest.json").write_text(json.dumps({"items": items}))
PY
cd bench
HRMEDSEG_SHARED_DATA=../runs/heldout $PY bench_clicks.py ft_clicks=../runs/ft_clicks.pt \
  hrmedseg_sam_default="../$INIT" litemedsam="$( [ -f "../$LITEMEDSAM" ] && echo "../$LITEMEDSAM" || echo "$LITEMEDSAM" )" \
  --images "$IMAGES" --max-objects "$MAX_OBJECTS" --device "$DEVICE" --threads 8 --json "$OUT_DIR/bench_clicks.json" \
  | tee "$OUT_DIR/bench_clicks.txt"
echo "whole call: $(( $(date +%s) - start )) s"
