#!/usr/bin/env bash
# Shared settings of the device/train_*.sh scripts (sourced, not run).
# DATA: the device payload's data folder (scripts/prepare_device_payload.py), OUT_DIR: where the
# weights, state and CSV log go ($OUT on the lent GPU machine, runs/ otherwise).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
DATA=${DATA:-device_payload/data}
OUT_DIR=${OUT_DIR:-${OUT:-runs}}
MINUTES=${MINUTES:-8}           # training time; data loading, validation and saving add about a minute
WORKERS=${WORKERS:-$(( $(nproc) > 9 ? 8 : $(nproc) - 1 ))}
EXTRA=${EXTRA:-}                # e.g. EXTRA="--epochs 2 --img-size 128 --encoder-preset tiny" for a smoke test
mkdir -p "$OUT_DIR"
PY=${PY:-python3}
train() {  # train NAME ARGS...: one fine-tuning run, log beside the weights
  local name=$1; shift
  $PY -m hrmedseg.training.cli finetune --out "$OUT_DIR/$name.pt" --time-limit-min "$MINUTES" \
      --num-workers "$WORKERS" --resume "$@" $EXTRA 2>&1 | tee "$OUT_DIR/$name.txt" | grep -v '^fine-tuning:' || true
  test -f "$OUT_DIR/$name.pt"
}
