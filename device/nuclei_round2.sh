#!/usr/bin/env bash
# Second round of device/train_nuclei_light.sh from round 1's light3 weights (in
# device_payload/data_nuc/init/), then device/eval_nuclei_auto.sh on round 1's and round 2's models.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-device_payload/wheels_slim} bash device/setup_gpu.sh
export SKIP_INSTALL=1 OUT=${OUT:-runs}
INIT=device_payload/data_nuc/init/nuclei_light3.pt LR=1e-4 RUNS="light3b:nuc_fit_light3 light5b:nuc_fit_light5" \
  MINUTES=${MINUTES:-6} bash device/train_nuclei_light.sh
bash device/eval_nuclei_auto.sh device_payload/data_nuc/init/nuclei_light3.pt "$OUT/nuclei_light3b.pt" "$OUT/nuclei_light5b.pt"
