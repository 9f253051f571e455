#!/usr/bin/env bash
# Prompt-free HRMedSeg, two classes (optic disc = label >= 1, cup = label 2), on Drishti-GS1 fundus
# photos downscaled to a 1024 long side by prepare_device_payload.py, whole image per input
# (crop mode: the 1024 x ~880 image fits a 1024 window). Writes $OUT_DIR/fundus_disc_cup.pt.
# Drishti-GS1 is research-use only: the weights say so in their provenance.
source "$(dirname "$0")/train_common.sh"
train fundus_disc_cup --model hrmedseg --data "$DATA/fundus_train" --val-data "$DATA/fundus_val" \
  --classes "disc:>=1,cup:2" --img-size 1024 --batch-size 8 --repeats 8 --amp --patience 40 \
  ${INIT_ENCODER:+--init-encoder "$INIT_ENCODER"} \
  --note "Drishti-GS1 training split (research use only, not redistributable; cite Sivaswamy et al. 2014/2015), images downscaled to 1024 long side"
