"""Time to the first box on a reopened image: cold (encoder) vs. warm disk embedding cache, in one run.

A fresh BoxPredictor (empty memory cache, as after restarting napari) segments one nucleus-sized
box of a TIFF: cold with an empty disk cache (reads the crop and runs the encoder, then writes the
entry), warm with the entry on disk (reads and checks it, no encoder). Repeated ``--repeats`` times,
medians reported; the predictor is built before the clock starts (weights loaded, digest taken).

    .venv/bin/python bench/bench_disk_cache.py [--model hrmedseg_sam_default] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tifffile
import torch
from report import cpu_name, print_and_save

from hrmedseg.engine import BoxPredictor
from hrmedseg.engine.disk_cache import DiskEmbeddingCache
from hrmedseg.models.loading import load_model_with_metadata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hrmedseg_sam_default")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model_with_metadata(args.model)
    box = (500.0, 400.0, 530.0, 428.0)
    work = Path(tempfile.mkdtemp())
    image = work / "image.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (1040, 1388, 3), dtype=np.uint8), tile=(256, 256))
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    for i in range(args.repeats):
        cache = DiskEmbeddingCache(work / f"cache{i}")
        for phase in ("cold", "warm"):
            predictor = BoxPredictor(loaded, device="cpu", backend="fast", disk_cache=cache)
            t0 = time.perf_counter()
            predictor.predict_box(str(image), box)
            times[phase].append(time.perf_counter() - t0)
            assert predictor.encoder_calls == (1 if phase == "cold" else 0)
    print_and_save({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(), "threads": args.threads,
        "model": args.model, "repeats": args.repeats,
        "cold_first_box_ms": round(1000 * statistics.median(times["cold"]), 1),
        "warm_disk_first_box_ms": round(1000 * statistics.median(times["warm"]), 1),
        "warm_min_ms": round(1000 * min(times["warm"]), 1), "warm_max_ms": round(1000 * max(times["warm"]), 1),
    }, args.json)


if __name__ == "__main__":
    main()
