"""Batch segmentation on Dask: label writing and worker memory on a 40000 x 40000 slide, and scaling.

Parts (each prints and saves JSON; baselines are measured in the same run):

- ``--part write``: 100 objects (the boxes of bench_large_tiff.spread_boxes, as ellipses) in a
  SparseLabels of the slide's size, written as a label TIFF (the baseline, hrmedseg segment's
  writer) and as OME-Zarr (hrmedseg batch's writer, chunks in parallel, only non-empty ones).
- ``--part slide``: ``run_batch`` of the 40000 x 40000 benchmark slide (made as bench_large_tiff
  makes it) with 100 boxes on a LocalCluster of ``--workers`` processes (region tasks): worker
  peak RSS (ru_maxrss, measured by the worker itself), label write time, wall time.
- ``--part scaling``: images per second over a folder of images (``--images``; e.g. the DSB
  held-out split) in each ``--modes`` (semantic: the prompt-free nuclei model; auto: every object
  by ``segment_auto``, its proposals through the box model; boxes: the masks' objects as boxes),
  for CPU clusters of each ``--workers-list`` size and, with ``--device cpu cuda``, one GPU
  worker; each cluster is started once and runs every mode, each row is printed as it is
  measured. Baseline: the old loop (``hrmedseg segment`` once per image, in this process, on
  ``--loop-device``), which writes a label TIFF and an object table per image; the batch writes
  ``--format`` (default tiff, so both write the same labels) plus its annotation JSON, and each
  row says how many images' labels equal the loop's. Start-up (cluster, one model load per
  worker) is timed apart from the steady images/s; scaling efficiency = (ips_N / ips_1) / N.

    .venv/bin/python bench/bench_batch.py --part write
    .venv/bin/python bench/bench_batch.py --part slide --small --workers 1
    python bench/bench_batch.py --part scaling --images device_payload/data/nuclei_val/images \
        --masks device_payload/data/nuclei_val/masks --limit 64 --modes semantic boxes auto --workers-list 1 2 4 8 --device cpu cuda
"""

from __future__ import annotations

import argparse
import json
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


def _cluster(workers: int | None, gpus: list[int] | None = None):
    """``(cluster, client)``, all workers up; each worker set up as ``hrmedseg batch`` does (local_cluster)."""
    from distributed import Client

    from hrmedseg.batch.cluster import local_cluster

    cluster, _ = local_cluster(workers, gpus)
    client = Client(cluster)
    client.wait_for_workers(len(gpus) if gpus else workers)
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
    cfg = BatchConfig("boxes", model, model_sha256=model_digest(model)["sha256"], device=args.device[0], region_size=args.region_size)
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


def _warm_up(client, cfg) -> float:
    """Seconds to load the model into every worker's cache: one task pinned to each worker
    (``client.run`` runs outside a task, where the worker's model cache is not found)."""
    from hrmedseg.batch.tasks import auto_predictors, box_predictor, semantic_predictor

    load = {"boxes": box_predictor, "semantic": semantic_predictor, "auto": auto_predictors}[cfg.mode]
    t = time.perf_counter()
    client.gather([client.submit(lambda c: load(c)[-1], cfg, workers=[w], allow_other_workers=False, pure=False, key=f"warm-{cfg.mode}-{w}")
                   for w in client.scheduler_info()["workers"]])
    return time.perf_counter() - t


def _read_labels(path: Path) -> np.ndarray:
    import tifffile
    import zarr

    return tifffile.imread(path) if path.suffix == ".tif" else np.asarray(zarr.open_group(str(path), mode="r")["0"][:])


def _compare_to_loop(jobs, loop_dir: Path, out: Path, output_format: str) -> dict:
    """How many images' batch labels equal the loop's, and the fraction of pixels that differ."""
    from hrmedseg.batch.outputs import LABELS_FILES

    equal, differ, total = 0, 0, 0
    for job in jobs:
        batch_file = out / job.key / LABELS_FILES[output_format]
        if not batch_file.exists():
            continue
        a, b = _read_labels(loop_dir / f"{job.key}.tif"), _read_labels(batch_file)
        equal += int(a.shape == b.shape and np.array_equal(a, b))
        differ += int((a != b).sum()) if a.shape == b.shape else a.size
        total += a.size
    return {"labels_equal_to_loop": f"{equal}/{len(jobs)}", "pixels_differing_from_loop": round(differ / max(total, 1), 6)}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _emit(row: dict) -> None:
    """One result row as a JSON line, at once (a long run shows its rows as they come)."""
    print(json.dumps(row), flush=True)


def _boxes_from_masks(images: list[Path], masks: Path, folder: Path) -> Path:
    """``folder`` of KEY.boxes.csv: the bounding boxes of each image's mask objects."""
    from skimage.io import imread
    from skimage.measure import regionprops

    folder.mkdir(parents=True, exist_ok=True)
    for p in images:
        mask = imread(masks / p.name)
        rows = [(r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in regionprops(mask.astype(np.int32))]
        np.savetxt(folder / f"{p.stem}.boxes.csv", np.asarray(rows, float).reshape(-1, 4), delimiter=",", header="x0,y0,x1,y1", comments="")
    return folder


def _loop(jobs, mode: str, model: str, device: str, out: Path) -> float:
    """The old way: ``hrmedseg segment`` once per image in this process (a model load per image);
    it writes each image's label TIFF and object table. Returns the seconds taken."""
    from hrmedseg.cli import main

    t = time.perf_counter()
    for job in jobs:
        argv = ["segment", job.image, "--out", str(out / f"{job.key}.tif"), "--model", model, "--device", device, "--no-progress"]
        # Boxes: no embedding cache on disk, or a repeated run of the bench would skip the encoder.
        rc = main(argv + {"boxes": ["--boxes", job.boxes, "--no-disk-cache"], "auto": ["--auto", "--no-disk-cache"]}.get(mode, []))
        if rc != 0:
            raise SystemExit(f"hrmedseg segment {job.image} failed ({rc})")
    return time.perf_counter() - t


def part_scaling(args) -> dict:
    """Both modes on each cluster: CPU clusters of each ``--workers-list`` size, then one GPU worker
    if ``--device`` lists cuda; each cluster is started once and runs every mode."""
    import contextlib
    import io

    from hrmedseg.batch import BatchConfig, expand_inputs, model_digest, run_batch

    t_start = time.perf_counter()
    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".tif", ".jpg"))[: args.limit]
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    boxes_dir = _boxes_from_masks(images, Path(args.masks), work / "boxes") if "boxes" in args.modes else None
    jobs, cfgs, result = {}, {}, {"part": "scaling", "images": len(images), "format": args.format, "loop": {}, "batch": []}
    for mode in args.modes:
        digest = model_digest(args.nuclei_model if mode == "semantic" else args.model)
        proposer = model_digest(args.nuclei_model)
        jobs[mode] = expand_inputs(images, boxes=boxes_dir if mode == "boxes" else None)
        cfgs[mode] = {dev: BatchConfig(mode, digest["path"], model_sha256=digest["sha256"], device=dev, output_format=args.format,
                                       proposer=proposer["path"], proposer_sha256=proposer["sha256"])
                      for dev in args.device}
        cpu0 = _cpu_seconds()
        with contextlib.redirect_stdout(io.StringIO()):  # its "wrote ..." line per image
            loop_s = _loop(jobs[mode], mode, digest["path"], args.loop_device, work / "loop" / mode)
        # CPU seconds per image as well as images/s: on a loaded machine the CPU time is the steadier figure.
        result["loop"][mode] = {"device": args.loop_device, "seconds": round(loop_s, 2), "images_per_s": round(len(images) / loop_s, 3),
                                "cpu_s_per_image": round((_cpu_seconds() - cpu0) / len(images), 3)}
        _emit({"mode": mode, "old_loop_images_per_s (baseline)": result["loop"][mode]["images_per_s"],
               "old_loop_cpu_s_per_image": result["loop"][mode]["cpu_s_per_image"], "device": args.loop_device,
               "seconds": round(loop_s, 2), "elapsed_s": round(time.perf_counter() - t_start, 1)})
    clusters = [("cpu", n, None) for n in args.workers_list] if "cpu" in args.device else []
    clusters += [("cuda", 1, [0])] if "cuda" in args.device else []
    for dev, n, gpus in clusters:
        t = time.perf_counter()
        cluster, client = _cluster(n, gpus)
        with cluster, client:
            cluster_s = time.perf_counter() - t
            for mode in args.modes:
                cfg = cfgs[mode][dev]
                # Start-up timed apart from throughput: every worker loads its model before the clock starts.
                models_s = _warm_up(client, cfg)
                out = work / f"{mode}_{dev}_w{n}"
                cpu0 = client.run(_cpu_seconds)
                t = time.perf_counter()
                manifest = run_batch(client, jobs[mode], out, cfg, progress=False)
                wall = time.perf_counter() - t
                cpu1 = client.run(_cpu_seconds)
                done = manifest.counts().get("done", 0)
                row = {"mode": mode, "device": dev, "workers": n, "done": done, "startup_cluster_s": round(cluster_s, 2),
                       "startup_models_s": round(models_s, 2), "steady_s": round(wall, 2), "images_per_s": round(done / wall, 3),
                       "images_per_s_with_startup": round(done / (cluster_s + models_s + wall), 3),
                       "worker_cpu_s_per_image": round(sum(cpu1[w] - cpu0[w] for w in cpu1 if w in cpu0) / max(done, 1), 3),
                       "old_loop_images_per_s (baseline)": result["loop"][mode]["images_per_s"],
                       "peak_rss_mib_max": max(e.get("peak_rss_mib") or 0 for e in manifest.images.values()),
                       **_compare_to_loop(jobs[mode], work / "loop" / mode, out, args.format),
                       "elapsed_s": round(time.perf_counter() - t_start, 1)}
                one = next((r for r in result["batch"] if r["mode"] == mode and r["device"] == "cpu" and r["workers"] == 1), None)
                if dev == "cpu" and one is not None:
                    row["scaling_efficiency"] = round(row["images_per_s"] / (one["images_per_s"] * n), 3)
                result["batch"].append(row)
                _emit(row)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("write", "slide", "scaling"), required=True)
    ap.add_argument("--size", type=int, default=40000)
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workers-list", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--region-size", type=int, default=8192)
    ap.add_argument("--device", nargs="+", default=["cpu"], choices=("cpu", "cuda"),
                    help="scaling: cpu (the --workers-list clusters) and/or cuda (one GPU worker); slide: the first")
    ap.add_argument("--loop-device", default="cpu", help="scaling: the old loop's device (its baseline)")
    ap.add_argument("--model", default="hrmedseg_sam_default")
    ap.add_argument("--nuclei-model", default="hrmedseg_nuclei")
    ap.add_argument("--modes", nargs="+", choices=("semantic", "auto", "boxes"), default=["semantic"], help="scaling: modes run on each cluster")
    ap.add_argument("--format", choices=("tiff", "ome-zarr"), default="tiff",
                    help="scaling: the batch's label output (default tiff: the loop's, so both write the same)")
    ap.add_argument("--images")
    ap.add_argument("--masks")
    ap.add_argument("--limit", type=int, default=64)
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
