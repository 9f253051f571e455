#!/usr/bin/env bash
# Box-prompted HRMedSegSAM on DSB 2018 nuclei: every nucleus is one box (jittered), whole images
# resized to 1024 as SamPredictor does at inference. Writes $OUT_DIR/nuclei_box.pt.
# Optional: INIT_ENCODER=SAM_PFD_10K.pth INIT_DECODER=sam_vit_h_4b8939.pth (none exist here: random init).
source "$(dirname "$0")/train_common.sh"
train nuclei_box --model hrmedseg-sam --data "$DATA/nuclei_train" --val-data "$DATA/nuclei_val" \
  --img-size 1024 --batch-size 8 --max-boxes 16 --amp --patience 30 \
  ${INIT_ENCODER:+--init-encoder "$INIT_ENCODER"} ${INIT_DECODER:+--init-decoder "$INIT_DECODER"} \
  --note "DSB 2018 stage1_train (BBBC038, CC0), fixed split by name hash (scripts/prepare_device_payload.py)"
