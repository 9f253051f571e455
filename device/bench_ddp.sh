#!/usr/bin/env bash
# Two GPUs (kind nvidia-h100-x2): HRMedSeg fine-tuning throughput with DDP next to one GPU's, same run.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}
ARGS="--img-size 1024 --batch-size 16 --steps 10 --warmup 3 --only hrmedseg-fp32 hrmedseg-amp-ckpt"
CUDA_VISIBLE_DEVICES=0 $PY bench/bench_training.py $ARGS | tee "$OUT/bench_ddp.md"
$PY -m torch.distributed.run --standalone --nproc-per-node 2 bench/bench_training.py --ddp $ARGS | tee -a "$OUT/bench_ddp.md"
# the real training loop under DDP too (2 epochs of the nuclei prompt-free recipe)
$PY -m torch.distributed.run --standalone --nproc-per-node 2 -m hrmedseg.training.cli finetune --model hrmedseg \
  --data device_payload/data/nuclei_train --val-data device_payload/data/nuclei_val --classes "nucleus:>=1" \
  --img-size 512 --batch-size 16 --epochs 2 --amp --out "$OUT/ddp_check.pt" 2>&1 | tr '\r' '\n' | grep -v step/s | tail -5
