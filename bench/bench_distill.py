"""Distillation throughput (images/s) with and without the teacher-embedding cache, in one run.

Writes --images random images (various sizes) to a temporary folder and runs the real
``hrmedseg.training.distill`` loop three times: (1) no cache, the teacher runs every step;
(2) filling the cache (teacher once per image); (3) training from the filled cache. Reports the
training images/s of the last epoch of (1) and (3) and the fill rate of (2).

GPU: python bench/bench_distill.py --teacher random:vit_b --img-size 1024 --batch-size 8 --amp
CPU smoke test: python bench/bench_distill.py --teacher random:tiny --img-size 128 --images 8 --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hrmedseg.training.distill import DistillConfig, distill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="random:vit_b")
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--encoder-preset", default="paper")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        for i in range(args.images):
            h, w = rng.integers(args.img_size // 2, args.img_size * 2, 2)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp / "images" / f"{i:05d}.jpg")
        common = dict(teacher=args.teacher, images=str(tmp / "images"), img_size=args.img_size,
                      batch_size=args.batch_size, epochs=args.epochs, amp=args.amp, encoder_preset=args.encoder_preset,
                      num_workers=args.num_workers)
        no_cache = distill(DistillConfig(out=str(tmp / "a.pt"), cache_dir="none", **common))
        events = []
        t0 = time.perf_counter()
        cached = distill(DistillConfig(out=str(tmp / "b.pt"), cache_dir=str(tmp / "cache"), **common), events.append)
        fill = [e for e in events if e["event"] == "cache"][0]
        cache_mb = sum(f.stat().st_size for f in (tmp / "cache").rglob("*.pt")) / 2**20
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"# distillation throughput, {device}, torch {torch.__version__}, {date.today()}: teacher {args.teacher}, "
          f"student {args.encoder_preset}, {args.img_size} px, batch {args.batch_size}, {'bf16 autocast' if args.amp else 'fp32'}, "
          f"{args.images} images\n")
    print("| mode | images/s (last epoch) |")
    print("|---|---|")
    print(f"| teacher every step (no cache) | {no_cache['history'][-1]['images_per_s']:.2f} |")
    print(f"| filling the cache (teacher only) | {fill['images'] / max(fill['seconds'], 1e-9):.2f} |")
    print(f"| from the cache | {cached['history'][-1]['images_per_s']:.2f} |")
    print(f"\ncache: {cache_mb:.1f} MiB for {args.images} images; run with cache took {time.perf_counter() - t0:.1f} s in all")


if __name__ == "__main__":
    main()
