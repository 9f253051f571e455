#!/usr/bin/env bash
# A second round of device/train_nuclei_light.sh from the shipped hrmedseg_nuclei (round 1's
# light3 since 2026-12-07) at a lower learning rate, light-background images x3 and x5, then
# device/eval_nuclei_auto.sh: each model on nuc_sel (to choose one) and on the held-out split
# (to report it), next to the shipped model in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_INSTALL:-}" ] || WHEELS=${WHEELS:-device_payload/wheels_slim} bash device/setup_gpu.sh
export SKIP_INSTALL=1 OUT=${OUT:-runs}
LR=1e-4 RUNS="light3b:nuc_fit_light3 light5b:nuc_fit_light5" MINUTES=${MINUTES:-6} bash device/train_nuclei_light.sh
bash device/eval_nuclei_auto.sh "$OUT/nuclei_light3b.pt" "$OUT/nuclei_light5b.pt"
