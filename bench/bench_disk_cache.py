"""Time to the first box on a reopened image: cold (encoder) vs. warm disk embedding cache, in one run.

A fresh BoxPredictor (empty memory cache, as after restarting napari) segments one nucleus-sized
box of a TIFF: cold with an empty disk cache (reads the crop and runs the encoder, then writes the
entry), warm with the entry on disk (reads and checks it, no encoder). Repeated ``--repeats`` times,
medians reported; the predictor is built before the clock starts (weights loaded, digest taken).
``--parts`` also times the warm box's parts (medians): reading and checking the disk entry, the
decoder's per-crop step (``FastMaskDecoder.prepare``), the box itself (``predict``), the box
prior rule, and the rest (opening the image, planning, prompts, pasting the mask).

    .venv/bin/python bench/bench_disk_cache.py [--model hrmedseg_sam_default] [--repeats 5] [--parts]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import tifffile
import torch
from report import cpu_name, print_and_save

import hrmedseg.engine.predictor as predictor_module
from hrmedseg.engine import BoxPredictor
from hrmedseg.engine.disk_cache import DiskEmbeddingCache
from hrmedseg.models.fast_decoder import FastMaskDecoder
from hrmedseg.models.loading import load_model_with_metadata

#: The warm box's timed parts: name -> (owner, attribute) of the function that does it.
PARTS = {
    "disk_read": (DiskEmbeddingCache, "get"),
    "decoder_per_crop": (FastMaskDecoder, "prepare"),
    "decoder_box": (FastMaskDecoder, "predict"),
    "prior_rule": (predictor_module, "apply_prior_rule"),
}


@contextlib.contextmanager
def timed_parts(seconds: dict[str, float]):
    """Within the block, each of :data:`PARTS` adds its wall time to ``seconds[name]``."""
    originals = {name: getattr(owner, attr) for name, (owner, attr) in PARTS.items()}

    def timed(name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        return run

    for name, (owner, attr) in PARTS.items():
        setattr(owner, attr, timed(name, originals[name]))
    try:
        yield seconds
    finally:
        for name, (owner, attr) in PARTS.items():
            setattr(owner, attr, originals[name])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hrmedseg_sam_default")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", action="store_true", help="also time the warm box's parts")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model_with_metadata(args.model)
    box = (500.0, 400.0, 530.0, 428.0)
    work = Path(tempfile.mkdtemp())
    image = work / "image.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 255, (1040, 1388, 3), dtype=np.uint8), tile=(256, 256))
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    parts: list[dict[str, float]] = []
    for i in range(args.repeats):
        cache = DiskEmbeddingCache(work / f"cache{i}")
        for phase in ("cold", "warm"):
            predictor = BoxPredictor(loaded, device="cpu", backend="fast", disk_cache=cache)
            with timed_parts({}) if args.parts and phase == "warm" else contextlib.nullcontext({}) as seconds:
                t0 = time.perf_counter()
                predictor.predict_box(str(image), box)
                times[phase].append(time.perf_counter() - t0)
            if seconds:
                parts.append({**seconds, "rest": times[phase][-1] - sum(seconds.values())})
            assert predictor.encoder_calls == (1 if phase == "cold" else 0)
    part_ms = {f"warm_{name}_ms": round(1000 * statistics.median(p[name] for p in parts), 2) for name in parts[0]} if parts else {}
    print_and_save({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(), "threads": args.threads,
        "model": args.model, "repeats": args.repeats,
        "cold_first_box_ms": round(1000 * statistics.median(times["cold"]), 1),
        "warm_disk_first_box_ms": round(1000 * statistics.median(times["warm"]), 1),
        "warm_min_ms": round(1000 * min(times["warm"]), 1), "warm_max_ms": round(1000 * max(times["warm"]), 1),
        **part_ms,
    }, args.json)


if __name__ == "__main__":
    main()
