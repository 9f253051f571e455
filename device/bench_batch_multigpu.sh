#!/usr/bin/env bash
# Multi-GPU machine (issue 17): hrmedseg batch with 1 GPU worker and with one worker per GPU
# (CUDA_VISIBLE_DEVICES per worker), prompt-free nuclei and boxes on the DSB held-out split tiled
# up to a few hundred images, and the 40000 x 40000 slide in region tasks; GPU utilisation
# sampled with nvidia-smi every second. Writes $OUT/bench_batch_gpus_*.json and $OUT/gpu_util_*.csv.
# Usage: bash device/setup_gpu.sh && bash device/bench_batch_multigpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}; mkdir -p "$OUT"
PY=${PY:-python3}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# A few hundred inputs: the val images repeated under distinct names (links, no copies of pixels).
SET=/tmp/batch_set; rm -rf "$SET"; mkdir -p "$SET/images" "$SET/masks"
for r in 0 1 2 3 4 5; do for f in device_payload/data/nuclei_val/images/*; do
  ln -s "$PWD/$f" "$SET/images/r${r}_$(basename "$f")"; ln -s "$PWD/device_payload/data/nuclei_val/masks/$(basename "$f")" "$SET/masks/r${r}_$(basename "$f")"; done; done
for MODE in semantic boxes; do
  for N in 1 "$NGPU"; do
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$OUT/gpu_util_${MODE}_${N}.csv" &
    SMI=$!
    timeout 600 $PY - "$MODE" "$N" "$SET" "$OUT" <<'PY'
import json, subprocess, sys, time
mode, n, data, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
args = ["--semantic", "hrmedseg_nuclei"] if mode == "semantic" else ["--boxes", f"{data}/boxes"]
if mode == "boxes":  # boxes from the masks' objects, once
    import numpy as np; from pathlib import Path; from skimage.io import imread; from skimage.measure import regionprops
    Path(f"{data}/boxes").mkdir(exist_ok=True)
    for p in Path(f"{data}/masks").iterdir():
        rows = [(r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in regionprops(imread(p).astype(np.int32))]
        np.savetxt(f"{data}/boxes/{p.stem}.boxes.csv", np.asarray(rows, float).reshape(-1, 4), delimiter=",", header="x0,y0,x1,y1", comments="")
t = time.perf_counter()
subprocess.run(["hrmedseg", "batch", f"{data}/images", "--out", f"/tmp/batch_out_{mode}_{n}", "--gpus", n, "--no-progress", *args], check=False)
wall = time.perf_counter() - t
m = json.load(open(f"/tmp/batch_out_{mode}_{n}/manifest.json"))
done = sum(e["status"] == "done" for e in m["images"].values())
json.dump({"mode": mode, "gpus": int(n), "images": done, "wall_s": round(wall, 1), "images_per_s": round(done / wall, 2)},
          open(f"{out}/bench_batch_gpus_{mode}_{n}.json", "w"), indent=1)
print(mode, n, done, "images", round(done / wall, 2), "images/s")
PY
    kill "$SMI"
  done
done
timeout 600 $PY bench/bench_batch.py --part slide --workers 1 --device cuda --workdir /tmp/hrmedseg_bench --json "$OUT/bench_batch_slide_gpu.json" | tail -n 15
