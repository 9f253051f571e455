"""Peak memory and time of 100 boxes on a 40000 x 40000 RGB tiled TIFF (4.8 GB uncompressed).

The TIFF (tiled 256 x 256, zlib, with a 2x pyramid in SubIFDs down to <= 1024 px) is made once,
tile by tile from a generator, in a child process (so its memory is not counted), and kept in
--workdir for later runs. The measured run opens it lazily, segments 100 boxes spread over the
slide (mostly cell-sized, some tissue-sized up to 8000 px, which are read from pyramid levels),
and writes the label TIFF tile by tile (hrmedseg.engine.SparseLabels). Reports wall time and peak
resident memory (ru_maxrss of this process, and psutil samples).

    .venv/bin/python bench/bench_large_tiff.py                     # full: 40000 x 40000
    .venv/bin/python bench/bench_large_tiff.py --size 6000 --small # quick check
    python bench/bench_large_tiff.py --device cuda --threads 16    # GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from report import PeakRSS, print_and_save

from hrmedseg.atomic import atomic_path

TILE = 256


def tile_pixels(ty: int, tx: int, step: int, tile: int = TILE) -> np.ndarray:
    """Procedural RGB tile (pink background, purple blobs on a 97 px lattice) at pyramid step."""
    y = (ty * tile + np.arange(tile)) * step
    x = (tx * tile + np.arange(tile)) * step
    yy, xx = np.meshgrid(y, x, indexing="ij")
    cy, cx = (yy // 97) * 97 + 48, (xx // 97) * 97 + 48
    r = 12 + ((cy * 7 + cx * 13) % 17)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    out = np.empty((tile, tile, 3), np.uint8)
    out[..., 0] = np.where(inside, 120, 235)
    out[..., 1] = np.where(inside, 60, 200)
    out[..., 2] = np.where(inside, 160, 220)
    return out


def make_tiff(path: Path, size: int) -> None:
    import tifffile

    levels = [size]
    while levels[-1] > 1024:
        levels.append(-(-levels[-1] // 2))
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, n in enumerate(levels):
            step = 2**i
            nt = -(-n // TILE)
            tiles = (tile_pixels(ty, tx, step) for ty in range(nt) for tx in range(nt))
            kw = dict(subifds=len(levels) - 1) if i == 0 else dict(subfiletype=1)
            tw.write(tiles, shape=(n, n, 3), dtype=np.uint8, tile=(TILE, TILE), compression="zlib", compressionargs={"level": 1}, photometric="rgb", **kw)


def spread_boxes(size: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = np.where(rng.random(n) < 0.9, rng.uniform(20, 200, n), rng.uniform(1000, min(8000, size / 3), n))
    xy = rng.uniform(0, size - sizes[:, None], (n, 2))
    return np.c_[xy, xy + sizes[:, None] * rng.uniform(0.6, 1.0, (n, 2))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40000)
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hrmedseg_bench"))
    ap.add_argument("--small", action="store_true", help="tiny encoder (checks the script, not the speed)")
    ap.add_argument("--make-only", action="store_true")
    ap.add_argument("--cache-mb", type=int, default=256, help="embedding cache bound")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"slide_{args.size}.tif"
    if args.make_only:
        make_tiff(path, args.size)
        return
    t_make = 0.0
    if not path.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make-only", "--size", str(args.size), "--workdir", str(work)], check=True)
        t_make = time.perf_counter() - t

    import torch

    torch.set_num_threads(args.threads)
    from hrmedseg.engine import BoxPredictor, SparseLabels
    from hrmedseg.io import open_image, write_label_tiff
    from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder
    from hrmedseg.models.sam import build_hrmedseg_sam

    rss = PeakRSS()
    rss_start = rss.start
    torch.manual_seed(0)
    model = build_hrmedseg_sam(HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))) if args.small else None)
    image = open_image(path)
    boxes = spread_boxes(args.size, args.boxes)
    predictor = BoxPredictor(model, device=args.device, cache_bytes=args.cache_mb * 2**20)
    t = time.perf_counter()
    labels, records = predictor.segment(image, boxes, labels=SparseLabels(image.shape_yx))
    t_seg = time.perf_counter() - t
    peak_segment = rss.peak
    out = work / f"labels_{args.size}.tif"
    t = time.perf_counter()
    write_label_tiff(out, labels, max_id=len(boxes))
    t_write = time.perf_counter() - t
    rss.stop()
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, threads {args.threads}",
        "device": args.device,
        "image": f"{args.size} x {args.size} RGB uint8, tiled {TILE}, zlib, {len(image.levels)} levels, {path.stat().st_size / 2**20:.0f} MiB on disk",
        "uncompressed_gb": round(args.size**2 * 3 / 1e9, 2),
        "boxes": len(boxes),
        "levels_used": sorted({int(o) for o in {c for c in [getattr(r, 'level', 0) for r in []]}}),
        "make_tiff_s": round(t_make, 1),
        "segment_s": round(t_seg, 2),
        "write_labels_s": round(t_write, 2),
        "peak_rss_during_segment_mib": round(peak_segment / 2**20),
        "encoder_calls": predictor.encoder_calls,
        "tiles_decoded": image.tiles_decoded,
        "tiles_total_level0": (-(-args.size // TILE)) ** 2,
        "empty": sum(r.empty for r in records),
        "rss_start_mib": round(rss_start / 2**20),
        "peak_rss_sampled_mib": round(rss.peak / 2**20),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "small_model": args.small,
    }
    del results["levels_used"]
    print_and_save(results, args.json)


if __name__ == "__main__":
    main()
