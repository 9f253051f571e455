"""Batch segmentation on Dask: label writing and worker memory on a 40000 x 40000 slide, and scaling.

Parts (each prints and saves JSON; baselines are measured in the same run):

- ``--part write``: 100 objects (the boxes of bench_large_tiff.spread_boxes, as ellipses) in a
  SparseLabels of the slide's size, written as a label TIFF (the baseline, hrmedseg segment's
  writer) and as OME-Zarr (hrmedseg batch's writer, chunks in parallel, only non-empty ones).
- ``--part slide``: ``run_batch`` of the 40000 x 40000 benchmark slide (made as bench_large_tiff
  makes it) with 100 boxes on a LocalCluster of ``--workers`` processes (region tasks): worker
  peak RSS (ru_maxrss, measured by the worker itself), label write time, wall time.
- ``--part scaling``: images per second over a folder of images (``--images``; e.g. the DSB
  held-out split) for each ``--workers-list`` entry, in ``--mode auto`` (prompt-free nuclei) or
  ``boxes`` (boxes from the masks' objects), against the old loop (``hrmedseg segment`` once per
  image, in this process) as the baseline; scaling efficiency = (ips_N / ips_1) / N.

    .venv/bin/python bench/bench_batch.py --part write
    .venv/bin/python bench/bench_batch.py --part slide --small --workers 1
    python bench/bench_batch.py --part scaling --images device_payload/data/nuclei_val/images \
        --masks device_payload/data/nuclei_val/masks --workers-list 1 2 4 8 --mode auto
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from bench_large_tiff import spread_boxes
from report import cpu_name, print_and_save


def _ellipse_objects(size: int, n: int):
    from hrmedseg.engine import ObjectMask, SparseLabels

    labels = SparseLabels((size, size))
    for i, (x0, y0, x1, y1) in enumerate(spread_boxes(size, n)):
        r = (int(y0), int(np.ceil(y1)), int(x0), int(np.ceil(x1)))
        yy, xx = np.ogrid[: r[1] - r[0], : r[3] - r[2]]
        h, w = r[1] - r[0], r[3] - r[2]
        mask = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1
        labels.add(ObjectMask((x0, y0, x1, y1), r, mask, 1.0), i + 1)
    return labels


def part_write(args) -> dict:
    from hrmedseg.io import write_label_image, write_label_tiff

    labels = _ellipse_objects(args.size, args.boxes)
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    t = time.perf_counter()
    write_label_tiff(work / "labels.tif", labels, max_id=args.boxes)
    tiff_s = time.perf_counter() - t
    t = time.perf_counter()
    write_label_image(work / "labels.ome.zarr", labels, max_id=args.boxes)
    zarr_s = time.perf_counter() - t
    chunks = sum(1 for p in (work / "labels.ome.zarr" / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    return {"part": "write", "size": args.size, "objects": args.boxes, "label_tiff_s (baseline)": round(tiff_s, 2),
            "ome_zarr_s": round(zarr_s, 2), "level0_chunks_written": chunks, "level0_chunks_total": (-(-args.size // 1024)) ** 2}


def _cluster(workers: int):
    from distributed import Client

    from hrmedseg.batch import WorkerSetup
    from hrmedseg.batch.cluster import local_cluster

    cluster, threads = local_cluster(workers)
    client = Client(cluster)
    client.register_plugin(WorkerSetup(threads), name=WorkerSetup.name)
    return cluster, client


def _model(args, work: Path) -> str:
    if not args.small:
        return args.model
    import torch

    from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder
    from hrmedseg.models.sam import build_hrmedseg_sam, save_hrmedseg_sam

    torch.manual_seed(0)
    return str(save_hrmedseg_sam(build_hrmedseg_sam(HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))), work / "small.pt"))


def part_slide(args) -> dict:
    from hrmedseg.batch import BatchConfig, expand_inputs, model_digest, run_batch

    work = Path(args.workdir)
    slide = work / f"slide_{args.size}.tif"
    if not slide.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_large_tiff.py")), "--make-only", "--size", str(args.size),
                        "--workdir", str(work)], check=True)
    boxes = work / f"slide_{args.size}.boxes.csv"
    np.savetxt(boxes, spread_boxes(args.size, args.boxes), delimiter=",", header="x0,y0,x1,y1", comments="")
    model = _model(args, work)
    cfg = BatchConfig("boxes", model, model_sha256=model_digest(model)["sha256"], device=args.device, region_size=args.region_size)
    out = Path(tempfile.mkdtemp(dir=work))
    cluster, client = _cluster(args.workers)
    with cluster, client:
        t = time.perf_counter()
        manifest = run_batch(client, expand_inputs([slide], boxes=boxes), out, cfg, progress=False)
        wall = time.perf_counter() - t
    entry = manifest.images[next(iter(manifest.images))]
    return {"part": "slide", "size": args.size, "boxes": args.boxes, "workers": args.workers, "status": entry["status"],
            "error": entry.get("error"), "regions": entry.get("regions"), "wall_s": round(wall, 1),
            "segment_s (sum over regions)": entry.get("segment_seconds"), "write_labels_s": entry.get("write_seconds"),
            "worker_peak_rss_mib": entry.get("peak_rss_mib"), "small_model": args.small}


def part_scaling(args) -> dict:
    from hrmedseg.batch import BatchConfig, expand_inputs, model_digest, run_batch
    from hrmedseg.cli import main

    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".tif", ".jpg"))[: args.limit]
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    boxes_dir = None
    if args.mode == "boxes":  # the objects of each image's mask as its boxes
        from skimage.io import imread
        from skimage.measure import regionprops

        boxes_dir = work / "boxes"
        boxes_dir.mkdir()
        for p in images:
            mask = imread(Path(args.masks) / p.name)
            rows = [(r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in regionprops(mask.astype(np.int32))]
            np.savetxt(boxes_dir / f"{p.stem}.boxes.csv", np.asarray(rows, float).reshape(-1, 4), delimiter=",", header="x0,y0,x1,y1", comments="")
    model = args.model if args.mode == "boxes" else args.nuclei_model
    digest = model_digest(model)
    jobs = expand_inputs(images, boxes=boxes_dir)
    # Baseline: the old loop, `hrmedseg segment` once per image (a model load per image), one process.
    t = time.perf_counter()
    for job in jobs:
        argv = ["segment", job.image, "--out", str(work / "loop" / f"{job.key}.tif"), "--model", model, "--device", args.device, "--no-progress"]
        main(argv + (["--boxes", job.boxes] if job.boxes else []))
    loop_s = time.perf_counter() - t
    result = {"part": "scaling", "mode": args.mode, "images": len(jobs), "device": args.device,
              "old_loop_images_per_s (baseline)": round(len(jobs) / loop_s, 3), "batch": []}
    from hrmedseg.batch.tasks import box_predictor, prompt_free_predictor

    load = box_predictor if args.mode == "boxes" else prompt_free_predictor
    for n in args.workers_list:
        t = time.perf_counter()
        cluster, client = _cluster(n)
        with cluster, client:
            client.wait_for_workers(n)
            cluster_s = time.perf_counter() - t
            cfg = BatchConfig(args.mode, digest["path"], model_sha256=digest["sha256"], device=args.device)
            # Start-up timed apart from throughput: every worker loads its model before the clock starts.
            t = time.perf_counter()
            client.run(lambda: load(cfg)[1])
            models_s = time.perf_counter() - t
            t = time.perf_counter()
            manifest = run_batch(client, jobs, work / f"w{n}", cfg, progress=False)
            wall = time.perf_counter() - t
        done = manifest.counts().get("done", 0)
        result["batch"].append({"workers": n, "done": done, "startup_cluster_s": round(cluster_s, 2), "startup_models_s": round(models_s, 2),
                                "wall_s": round(cluster_s + models_s + wall, 2), "steady_s": round(wall, 2),
                                "images_per_s": round(done / wall, 3), "images_per_s_with_startup": round(done / (cluster_s + models_s + wall), 3),
                                "peak_rss_mib_max": max(e.get("peak_rss_mib") or 0 for e in manifest.images.values())})
    base = result["batch"][0]["images_per_s"] / result["batch"][0]["workers"]
    for row in result["batch"]:
        row["scaling_efficiency"] = round(row["images_per_s"] / (base * row["workers"]), 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("write", "slide", "scaling"), required=True)
    ap.add_argument("--size", type=int, default=40000)
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workers-list", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--region-size", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="hrmedseg_sam_default")
    ap.add_argument("--nuclei-model", default="hrmedseg_nuclei")
    ap.add_argument("--mode", choices=("auto", "boxes"), default="auto")
    ap.add_argument("--images")
    ap.add_argument("--masks")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--small", action="store_true", help="tiny box model (checks memory and writing, not the model's speed)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hrmedseg_bench"))
    ap.add_argument("--json")
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(), "cpus": os.cpu_count()}
    result.update({"write": part_write, "slide": part_slide, "scaling": part_scaling}[args.part](args))
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
