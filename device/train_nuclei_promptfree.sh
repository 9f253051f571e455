#!/usr/bin/env bash
# Prompt-free HRMedSeg (one class: nucleus foreground) on DSB 2018 nuclei, 512 x 512 crops at
# native resolution (small images padded). Writes $OUT_DIR/nuclei_promptfree.pt.
source "$(dirname "$0")/train_common.sh"
train nuclei_promptfree --model hrmedseg --data "$DATA/nuclei_train" --val-data "$DATA/nuclei_val" \
  --classes "nucleus:>=1" --img-size 512 --batch-size 16 --repeats 2 --amp --patience 30 \
  ${INIT_ENCODER:+--init-encoder "$INIT_ENCODER"} \
  --note "DSB 2018 stage1_train (BBBC038, CC0), fixed split by name hash (scripts/prepare_device_payload.py)"
