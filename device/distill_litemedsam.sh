#!/usr/bin/env bash
# Feature distillation of LGViT + neck from LiteMedSAM's TinyViT on the lent GPU (issue #19).
# Needs `python scripts/prepare_device_payload.py --distill` first (device_payload/ travels with
# `carry`). Each call runs for MINUTES and saves after every epoch; the state comes back split in
# 15 MiB parts ($OUT returns files of at most 16 MiB). Put those parts in device_payload/resume/
# and call again to continue where it stopped.
source "$(dirname "$0")/train_common.sh"
python3 -m pip install -q --no-index --no-deps device_payload/wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONPATH=$PWD/device_payload/site${PYTHONPATH:+:$PYTHONPATH}
NAME=${NAME:-lgvit_litemedsam}
STATE="$OUT_DIR/$NAME.state.pt"
if compgen -G "device_payload/resume/$NAME.state.pt.part-*" >/dev/null; then
  cat device_payload/resume/$NAME.state.pt.part-* > "$STATE"
  cp device_payload/resume/$NAME.log.csv "$OUT_DIR/" 2>/dev/null || true
  echo "resuming from $(du -h "$STATE" | cut -f1) of state"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
$PY -m hrmedseg.training.cli distill --teacher device_payload/teacher/lite_medsam_fp16.pt \
  --images "${IMAGES:-device_payload/distill_images}" --out "$OUT_DIR/$NAME.pt" --cache-dir "${CACHE:-/tmp/teacher_cache}" \
  --views-per-image "${VIEWS:-16}" --epochs "${EPOCHS:-20}" --batch-size "${BATCH:-16}" --amp \
  --num-workers "$WORKERS" --time-limit-min "$MINUTES" --resume $EXTRA 2>&1 | tee "$OUT_DIR/$NAME.txt" | grep -v '^distilling:' || true
echo "distillation call: $(( $(date +%s) - start )) s"
test -f "$STATE"
split -b 15M -d "$STATE" "$STATE.part-" && rm "$STATE"
ls -la "$OUT_DIR"
