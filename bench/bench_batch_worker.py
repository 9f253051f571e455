"""Inside one batch worker: its environment, torch threads in the task thread, and per-image cost.

A 1-worker ``local_cluster`` (as ``hrmedseg batch`` starts it); the model is loaded by a task
first, then ``N`` semantic-mode image tasks (``segment_image``, prompt-free nuclei) run one by one.
Prints the worker's OMP/MKL/malloc variables, ``torch.get_num_threads()`` in the task thread, and
per image: wall seconds, the worker's minor page faults and user/system CPU seconds (the steadier
figures on a loaded machine). ``--register`` also registers ``WorkerSetup`` after start-up, as the
CLI did before issue 14's fix (to run older code the same way: ``PYTHONPATH=<old>/src``).

    .venv/bin/python bench/bench_batch_worker.py --images IMAGES_DIR --limit 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def worker_state() -> dict:
    """This process's torch threads (in the calling thread), variables, page faults and CPU time."""
    import threading

    import torch

    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"thread": threading.current_thread().name, "torch_threads": torch.get_num_threads(), "minflt": r.ru_minflt,
            "utime": r.ru_utime, "stime": r.ru_stime,
            **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")}}


def main() -> None:
    from distributed import Client

    import hrmedseg.batch as batch
    from hrmedseg.batch import BatchConfig, expand_inputs, model_digest
    from hrmedseg.batch.cluster import local_cluster
    from hrmedseg.batch.tasks import segment_image, semantic_predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--model", default="hrmedseg_nuclei")
    ap.add_argument("--register", action="store_true", help="register WorkerSetup after start-up too (pre-fix CLI)")
    args = ap.parse_args()
    jobs = expand_inputs(sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".tif", ".jpg"))[: args.limit])
    digest = model_digest(args.model)
    cfg = BatchConfig("semantic", digest["path"], model_sha256=digest["sha256"], device="cpu")
    cluster, threads = local_cluster(1)
    with cluster, Client(cluster) as client:
        if args.register:
            client.register_plugin(batch.WorkerSetup(threads), name=batch.WorkerSetup.name)
        client.submit(lambda: semantic_predictor(cfg)[1], pure=False).result()  # the model, in the worker's cache
        s0 = client.submit(worker_state, pure=False).result()
        out = tempfile.mkdtemp()
        t = time.perf_counter()
        for job in jobs:
            client.submit(segment_image, job, cfg, out, pure=False).result()
        wall = time.perf_counter() - t
        s1 = client.submit(worker_state, pure=False).result()
    n = len(jobs)
    print(json.dumps({"images": n, "sizing_threads": threads, "worker_task_thread": {k: v for k, v in s0.items() if k not in ("minflt", "utime", "stime")},
                      "s_per_image": round(wall / n, 3), "minor_faults_per_image": (s1["minflt"] - s0["minflt"]) // n,
                      "worker_user_cpu_s_per_image": round((s1["utime"] - s0["utime"]) / n, 3),
                      "worker_sys_cpu_s_per_image": round((s1["stime"] - s0["stime"]) / n, 3)}, indent=1))


if __name__ == "__main__":
    main()
