"""Peak memory and time of "segment every object" (BoxPredictor.segment_auto) on a large tiled TIFF.

The slide is bench_large_tiff.py's (procedural purple blobs on pink, tiled 256, zlib, 2x
pyramid), made once in --workdir in a child process (its time is reported). The measured run
opens it lazily, proposes objects tile by tile with the bundled prompt-free nuclei model
(``--tile`` native px plus a halo), segments each proposal with the box model into a
SparseLabels and writes the label TIFF tile by tile. Reports wall time, proposals and peak
resident memory (psutil samples and ru_maxrss).

With ``--workers N`` the same slide goes through ``hrmedseg batch --auto`` instead
(``run_batch`` on an embedded LocalCluster of N worker processes on ``--device``, cell tasks of
``--region-size``, OME-Zarr labels): wall time, cell tasks, objects, label write time, and the
peak RSS of each worker (measured by the worker itself) and of this client process.

    .venv/bin/python bench/bench_auto_large.py --size 2048                      # quick, CPU
    python bench/bench_auto_large.py --size 40000 --device cuda --threads 16    # device/bench_auto_large.sh
    python bench/bench_auto_large.py --size 40000 --device cuda --workers 16 --region-size 4096   # device/bench_auto_slide_batch.sh
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_large_tiff import TILE
from report import PeakRSS, cpu_name, print_and_save


class ProgressLine:
    """Prints boxes done, elapsed time and RSS every 15 s, so a run cut short by a time limit still
    says how far it got (the proposals come first, before the first line)."""

    def __init__(self, t0: float, rss: PeakRSS) -> None:
        self.t0, self.rss, self.last = t0, rss, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last >= 15 or done == total:
            self.last = now
            print(f"  {done}/{total} boxes, {now - self.t0:.0f} s, peak RSS {self.rss.peak / 2**20:.0f} MiB", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40000)
    ap.add_argument("--tile", type=int, default=2048, help="auto proposal tile (native px)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--box-model", default="hrmedseg_sam_default")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hrmedseg_bench"))
    ap.add_argument("--workers", type=int, help="run hrmedseg batch --auto on a LocalCluster of this many workers instead")
    ap.add_argument("--region-size", type=int, default=8192, help="--workers: the batch's cell size (px)")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"slide_{args.size}.tif"
    make_s = 0.0
    if not path.exists():
        bench = Path(__file__).with_name("bench_large_tiff.py")
        t = time.perf_counter()
        subprocess.run([sys.executable, str(bench), "--make-only", "--size", str(args.size), "--workdir", str(work)], check=True)
        make_s = time.perf_counter() - t
        print(f"  made {path.name} in {make_s:.0f} s", file=sys.stderr, flush=True)
    if args.workers:
        return print_and_save({"make_slide_s": round(make_s, 1), **run_batch_auto(args, path)}, args.json)

    import torch

    torch.set_num_threads(args.threads)
    from hrmedseg.engine import BoxPredictor, SparseLabels
    from hrmedseg.engine.auto import AutoOptions
    from hrmedseg.io import open_image, write_label_tiff

    logging.basicConfig(format="%(message)s")
    logging.getLogger("hrmedseg.engine.auto").setLevel(logging.INFO)  # the proposal count
    rss = PeakRSS()
    rss_start = rss.start
    predictor = BoxPredictor(args.box_model, device=args.device)
    image = open_image(path)
    t = time.perf_counter()
    labels, records = predictor.segment_auto(image, labels=SparseLabels(image.shape_yx, overlap="keep_existing"),
                                             options=AutoOptions(tile=args.tile), progress=ProgressLine(t, rss))
    t_seg = time.perf_counter() - t
    peak_segment = rss.peak
    t = time.perf_counter()
    write_label_tiff(work / f"auto_labels_{args.size}.tif", labels, max_id=len(records))
    t_write = time.perf_counter() - t
    rss.stop()
    print_and_save({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(), "threads": args.threads, "device": args.device, "torch": torch.__version__,
        "image": f"{args.size} x {args.size} RGB uint8, tiled {TILE}, zlib, {len(image.levels)} levels",
        "uncompressed_gb": round(args.size**2 * 3 / 1e9, 2),
        "objects": len(records), "empty": sum(r.empty for r in records),
        "segment_auto_s": round(t_seg, 1), "write_labels_s": round(t_write, 1),
        "encoder_calls": predictor.encoder_calls,
        "rss_start_mib": round(rss_start / 2**20),
        "peak_rss_during_segment_mib": round(peak_segment / 2**20),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }, args.json)


def run_batch_auto(args: argparse.Namespace, path: Path) -> dict:
    """``hrmedseg batch --auto`` of the slide on a LocalCluster of ``args.workers`` processes."""
    import shutil

    import torch
    from distributed import Client

    from hrmedseg.batch import BatchConfig, expand_inputs, model_digest, run_batch
    from hrmedseg.batch.cluster import local_cluster
    from hrmedseg.defaults import DEFAULT_PROMPT_FREE_MODELS

    box, proposer = model_digest(args.box_model), model_digest(DEFAULT_PROMPT_FREE_MODELS["nuclei"])
    cfg = BatchConfig("auto", box["path"], model_sha256=box["sha256"], device=args.device, region_size=args.region_size,
                      proposer=proposer["path"], proposer_sha256=proposer["sha256"])
    out = path.with_name(f"batch_auto_{args.size}")
    shutil.rmtree(out, ignore_errors=True)
    rss = PeakRSS()
    t = time.perf_counter()
    cluster, threads = local_cluster(args.workers)
    with cluster, Client(cluster) as client:
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        manifest = run_batch(client, expand_inputs([path]), out, cfg, progress=True)
        wall = time.perf_counter() - t
    rss.stop()
    entry = manifest.images[path.stem]
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "device": args.device, "workers": args.workers, "torch_threads_per_worker": threads,
        "region_size": args.region_size, "image": f"{args.size} x {args.size} RGB uint8, tiled {TILE}, zlib",
        "status": entry["status"], "error": entry.get("error"), "cell_tasks": entry.get("regions"),
        "objects": entry.get("objects"), "cluster_start_s": round(start_s, 1), "batch_wall_s": round(wall, 1),
        "cell_task_s_sum": entry.get("segment_seconds"), "write_labels_s": entry.get("write_seconds"),
        "worker_peak_rss_mib_max": entry.get("peak_rss_mib"), "client_peak_rss_mib": round(rss.peak / 2**20),
        "workers_used": len(entry.get("region_workers") or []),
    }


if __name__ == "__main__":
    main()
