#!/usr/bin/env bash
# Multi-node DDP launch, checked on one 2-GPU host (kind nvidia-h100-x2): two torchrun "nodes" of
# one GPU each meet through a c10d rendezvous on localhost, exactly as two machines would through
# a shared address, and run the real fine-tuning loop for 2 epochs.
# Usage: bash device/setup_gpu.sh && bash device/multinode_check.sh [DATA_FOLDER]
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-runs}; mkdir -p "$OUT"
DATA=${1:-device_payload/data/nuclei_val}
LAUNCH=(-m torch.distributed.run --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d
        --rdzv-endpoint 127.0.0.1:29400 --rdzv-id hrmedseg-multinode)
TRAIN=(-m hrmedseg.training.cli finetune --model hrmedseg --data "$DATA" --classes "nucleus:>=1"
       --img-size 512 --batch-size 8 --epochs 2 --amp --out "$OUT/multinode.pt")
CUDA_VISIBLE_DEVICES=1 python3 "${LAUNCH[@]}" "${TRAIN[@]}" > "$OUT/node1.log" 2>&1 &
CUDA_VISIBLE_DEVICES=0 python3 "${LAUNCH[@]}" "${TRAIN[@]}" > "$OUT/node0.log" 2>&1
wait $! || { echo "node 1 failed:"; tail -n 20 "$OUT/node1.log"; }
# The rendezvous gives rank 0 to either launcher: the main process log is in one of the two.
cat "$OUT/node0.log" "$OUT/node1.log" | tr "\r" "\n" | grep -v "step/s" | grep "epoch\|Dice" | tail -n 8
python3 - "$OUT/multinode.log.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{len(rows)} epochs logged; last: " + ", ".join(f"{k}={rows[-1][k]}" for k in ("epoch", "train_loss", "val_dice", "images_per_s")))
PY
