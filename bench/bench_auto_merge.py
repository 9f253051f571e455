"""The merge of ``hrmedseg batch --auto`` on a whole slide's objects: time and peak memory per step.

No model runs: the objects are the benchmark slide's blobs (bench_large_tiff.tile_pixels: one
per 97 px lattice point, radius 12-28 px, about 170,000 on 40000 x 40000) as the packed masks a
cell task returns, split over 100 cells. Steps, as ``finish_auto`` runs them: ``merge_cells``
(box NMS across cells), adding the masks to a SparseLabels, the object records, and
``write_image_outputs`` (OME-Zarr labels and the annotation JSON). Baseline in the same run:
torchvision's all-pairs NMS on the same boxes (what ``nms_boxes`` ran before).

    python bench/bench_auto_merge.py [--size 40000] [--format ome-zarr|tiff] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from report import PeakRSS, cpu_name, print_and_save

LATTICE, BOX = 97, 50


def lattice_objects(size: int) -> list:
    """The slide's blobs as PackedProposals (50 px boxes around each lattice point)."""
    from hrmedseg.batch.tasks import PackedProposal

    yy, xx = np.mgrid[:BOX, :BOX] - BOX // 2
    objects = []
    for cy in range(48, size - 48, LATTICE):
        for cx in range(48, size - 48, LATTICE):
            r = 12 + ((cy * 7 + cx * 13) % 17)
            y0, x0 = cy - BOX // 2, cx - BOX // 2
            box = (float(x0), float(y0), float(x0 + BOX), float(y0 + BOX))
            bits = np.packbits(yy**2 + xx**2 < r * r, axis=None)
            objects.append(PackedProposal(len(objects), box, (y0, y0 + BOX, x0, x0 + BOX), bits, 0.9, box, float(r)))
    return objects


def main() -> None:
    from hrmedseg.batch.inputs import ImageJob
    from hrmedseg.batch.outputs import write_image_outputs
    from hrmedseg.batch.tasks import merge_cells
    from hrmedseg.engine import SparseLabels
    from hrmedseg.store import ObjectRecord

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40000)
    ap.add_argument("--format", choices=("ome-zarr", "tiff"), default="ome-zarr")
    ap.add_argument("--json")
    args = ap.parse_args()

    objects = lattice_objects(args.size)
    parts = [{"objects": objects[k::100], "shape_yx": (args.size, args.size)} for k in range(100)]
    boxes = np.array([o.proposal_box for o in objects])
    scores = np.array([o.proposal_score for o in objects])
    t0 = time.perf_counter()
    import torchvision

    torchvision.ops.nms(torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32), 0.7)
    baseline_nms_s = time.perf_counter() - t0

    rss, steps = PeakRSS(), {}

    def step(name: str, since: float) -> None:
        steps[name] = {"seconds": round(time.perf_counter() - since, 2), "rss_mib": rss._proc.memory_info().rss >> 20,
                       "peak_mib": rss.peak >> 20}

    t = time.perf_counter()
    merged = merge_cells(parts, 0.7)
    step("merge_cells (nms_boxes)", t)
    t = time.perf_counter()
    labels = SparseLabels((args.size, args.size), overlap="keep_existing")
    for oid, p in enumerate(merged, start=1):
        labels.add_packed(p.region, p.bits, oid)
    step("masks added", t)
    t = time.perf_counter()
    model = {"name": "bench", "sha256": "0" * 64}
    records = [ObjectRecord(id=oid, box_xyxy=p.box, prompt={"type": "auto", "proposer": "nuclei", "box_xyxy": list(p.box)},
                            model=model, score=p.score) for oid, p in enumerate(merged, start=1)]
    step("records", t)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        write_image_outputs(Path(out), ImageJob(image="slide.tif", key="slide"), labels, records, args.format, max_id=len(merged))
        step(f"written ({args.format} + annotation JSON)", t)
    rss.stop()
    print_and_save({"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "cpu": cpu_name(),
                    "size": args.size, "objects": len(objects), "kept": len(merged),
                    "baseline: torchvision all-pairs NMS, s": round(baseline_nms_s, 2),
                    "rss_before_mib": rss.start >> 20, "steps": steps, "peak_mib": rss.peak >> 20}, args.json)


if __name__ == "__main__":
    main()
