#!/usr/bin/env bash
# Trains the product's default models on one GPU from the real annotated images carried in
# device_payload/data (made by scripts/prepare_device_payload.py) and writes half-precision
# bundles plus training logs to $OUT. Usage: device/train_default_models.sh MODE [MINUTES]
#   box:      one HRMedSegSAM for nuclei and the fundus optic disc and cup (box prompts)
#   semantic: prompt-free HRMedSeg for nuclei foreground, then for optic disc + cup
#
# The shipped files came from this sequence (each line one GPU call; between calls, copy the
# returned file into device_payload/init/ under the name the next call reads):
#   1. box 7.5                                      -> init/box_round1.pt
#      python scripts/extract_encoder.py device_payload/init/box_round1.pt device_payload/init/encoder_round1.pt
#   2. semantic 4                                   -> init/nuclei_semantic.pt (shipped), init/fundus_semantic.pt
#   3. box-continue 7.3                             -> init/box_round2.pt
#   4. INIT=device_payload/init/box_round2.pt BOX_PRIOR=ellipse box-continue 6.8  -> shipped box model
#   5. fundus-continue 3.5                          -> shipped fundus model
# then src/hrmedseg/weights/default/ and registry.json (sha256, size) are updated.
# Afterwards the box model's IoU head (its scores) was trained alone on a 2-core CPU
# (`--train-only iou-head --init` the shipped file, the settings of step 4; the exact command is
# in the model card and in the bundle's provenance["iou_head_training"]).
set -euo pipefail
cd "$(dirname "$0")/.."
what=$1; minutes=${2:-8}
OUT=${OUT:-outputs}; mkdir -p "$OUT" runs
D=device_payload/data
train() {  # name, then finetune arguments
  local name=$1; shift
  python3 -m hrmedseg.training.cli finetune --out "runs/$name.pt" --amp --time-limit-min "$minutes" \
    --note "default model trained by device/train_default_models.sh" "$@" 2>&1 | tr '\r' '\n' | grep -v "step/s" || true
  python3 -c "from hrmedseg.weights.bundle import convert_bundle_dtype as c; c('runs/$name.pt', '$OUT/$name.pt')"
  cp "runs/$name.log.csv" "$OUT/$name.log.csv"
}
case $what in
  box)
    train hrmedseg-sam-default --model hrmedseg-sam --data $D/box_train --val-data $D/box_val \
      --img-size 1024 --input-mode fit --batch-size 16 --max-boxes 16 --lr 4e-4 --lr-decay 0.99 --epochs 400 --patience 400 ;;
  box-continue)  # a further round from an earlier round's weights (INIT, default round 1)
    train hrmedseg-sam-default --model hrmedseg-sam --data $D/box_train --val-data $D/box_val \
      --init "${INIT:-device_payload/init/box_round1.pt}" --input-mode crop ${BOX_PRIOR:+--box-prior $BOX_PRIOR} \
      --img-size 1024 --scale 2 --batch-size 16 --max-boxes 16 --lr 2e-4 --lr-decay 0.95 --epochs 400 --patience 400 ;;
  semantic)  # encoders start from the box model's (device_payload/init/encoder_round1.pt)
    train hrmedseg-nuclei --init-encoder device_payload/init/encoder_round1.pt --model hrmedseg --data $D/nuclei_train --val-data $D/nuclei_val --classes "nucleus:>=1" \
      --img-size 1024 --scale 2 --batch-size 16 --lr 4e-4 --lr-decay 0.99 --epochs 400 --patience 400
    train hrmedseg-fundus --init-encoder device_payload/init/encoder_round1.pt --model hrmedseg --data $D/fundus_train --val-data $D/fundus_val --classes "disc:>=1,cup:2" \
      --img-size 1024 --input-mode fit --batch-size 8 --repeats 8 --lr 4e-4 --lr-decay 0.99 --epochs 400 --patience 400 ;;
  fundus-continue)  # more epochs of the fundus prompt-free model from device_payload/init/fundus_semantic.pt
    train hrmedseg-fundus --init device_payload/init/fundus_semantic.pt --model hrmedseg --data $D/fundus_train \
      --val-data $D/fundus_val --classes "disc:>=1,cup:2" --img-size 1024 --input-mode fit --batch-size 8 --repeats 8 \
      --lr 2e-4 --lr-decay 0.97 --epochs 400 --patience 400 ;;
  *) echo "usage: $0 box|box-continue|semantic|fundus-continue [MINUTES]" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.used --format=csv
