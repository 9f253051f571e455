"""``hrmedseg batch``: segment many images on a Dask cluster, resumable, into OME-Zarr labels.

    hrmedseg batch slides/ --boxes boxes/ --out results/                     # boxes, local workers
    hrmedseg batch "data/*.png" --auto --out results/ --workers 4            # every object, no boxes
    hrmedseg batch list.csv --semantic hrmedseg_fundus_disc_cup --out res/ --scheduler tcp://head:8786
    hrmedseg batch slides/ --boxes boxes/ --out results/ --gpus all          # one worker per GPU

Per image: OUT/KEY/labels.ome.zarr (or labels.tif) and OUT/KEY/annotations.json, each image
complete or absent; OUT/manifest.json records inputs, model digest, status, timings and errors.
Re-running the same command skips complete images.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..defaults import DEFAULT_BOX_MODEL, DEFAULT_PROMPT_FREE_MODELS

    p = sub.add_parser("batch", help="segment many images on a Dask cluster (resumable; OME-Zarr or TIFF labels)",
                       description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="image files, folders, glob patterns, or CSV lists (image[, boxes, points] columns)")
    p.add_argument("--out", required=True, help="output folder (per-image folders and manifest.json)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--boxes", help="box file for every image, or a folder of KEY.boxes.csv / KEY.csv / KEY.json files")
    mode.add_argument("--semantic", metavar="MODEL", help="prompt-free HRMedSeg model (registry name or path): no boxes")
    mode.add_argument("--auto", action="store_true",
                      help="every object without boxes, as `hrmedseg segment --auto`: --proposer's proposals, each through the box model")
    p.add_argument("--model", help=f"box model (default {DEFAULT_BOX_MODEL})")
    p.add_argument("--proposer", default="nuclei",
                   help=f"--auto: nuclei (the bundled prompt-free {DEFAULT_PROMPT_FREE_MODELS['nuclei']}), grid (SAM point grid on the box model) "
                        "or a one-class prompt-free model name/path (default nuclei)")
    p.add_argument("--format", dest="output_format", choices=("ome-zarr", "tiff"), default="ome-zarr", help="label output (default ome-zarr)")
    p.add_argument("--workers", type=int, help="local CPU worker processes (default: cores / 2)")
    p.add_argument("--gpus", help="'all' or N: one local worker per GPU, pinned with CUDA_VISIBLE_DEVICES")
    p.add_argument("--scheduler", default=os.environ.get("DASK_SCHEDULER_ADDRESS"),
                   help="address of a running Dask scheduler (default $DASK_SCHEDULER_ADDRESS; none: an embedded cluster)")
    p.add_argument("--tls-ca-file", help="TLS CA certificate for --scheduler tls://... (default: Dask's config)")
    p.add_argument("--tls-cert", help="TLS client certificate")
    p.add_argument("--tls-key", help="TLS client key")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps, on each worker (default auto)")
    p.add_argument("--threshold", type=float, default=0.5, help="prompt-free (and --auto proposer) foreground probability (default 0.5)")
    p.add_argument("--region-size", type=int, default=8192,
                   help="boxes spread wider than this, and prompt-free/--auto images larger than this, are split into region tasks (px)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from ..defaults import DEFAULT_BOX_MODEL, DEFAULT_PROMPT_FREE_MODELS
    from ..errors import InputError
    from ..batch import BatchConfig, model_digest

    if args.semantic:
        if args.model:
            raise InputError("--semantic names the model; leave --model out")
        mode, model = "semantic", args.semantic
    else:
        mode, model = "auto" if args.auto else "boxes", args.model or DEFAULT_BOX_MODEL
    if args.proposer != "nuclei" and mode != "auto":
        raise InputError("--proposer is for --auto")
    if args.region_size < 256:
        raise InputError(f"--region-size {args.region_size}: give at least 256 pixels")
    digest = model_digest(model)
    proposer, proposer_sha256 = args.proposer, None
    if mode == "auto" and proposer != "grid":
        proposer_digest = model_digest(DEFAULT_PROMPT_FREE_MODELS["nuclei"] if proposer == "nuclei" else proposer)
        proposer, proposer_sha256 = proposer_digest["path"], proposer_digest["sha256"]
    return BatchConfig(mode=mode, model=digest["path"], model_sha256=digest["sha256"], device=args.device,
                       output_format=args.output_format, threshold=args.threshold, region_size=args.region_size,
                       proposer=proposer, proposer_sha256=proposer_sha256)


def run(args: argparse.Namespace) -> int:
    import contextlib
    import dataclasses

    from ..batch import WorkerSetup, expand_inputs, run_batch
    from ..batch.cluster import connect, gpu_ids, local_cluster, security_from
    from ..batch.inputs import absolute_model_spec, absolute_path, with_absolute_paths
    from ..errors import InputError

    jobs = expand_inputs(args.inputs, boxes=args.boxes)
    cfg = _config(args)
    if cfg.mode == "boxes" and args.boxes is None and not any(j.boxes for j in jobs):
        raise InputError("boxes mode needs --boxes (or a 'boxes' column in a CSV list); or use --auto / --semantic MODEL")
    out = args.out
    if args.scheduler:  # remote workers have their own working folder: relative paths would point there
        jobs, out = with_absolute_paths(jobs), absolute_path(args.out)
        cfg = dataclasses.replace(cfg, model=absolute_model_spec(cfg.model), proposer=absolute_model_spec(cfg.proposer))
    with contextlib.ExitStack() as stack:
        if args.scheduler:
            if args.gpus or args.workers:
                raise InputError("--gpus and --workers size the embedded cluster; with --scheduler the cluster is already sized")
            client = stack.enter_context(connect(args.scheduler, security_from(args.tls_ca_file, args.tls_cert, args.tls_key, args.scheduler)))
            # Its workers are sized by whoever started them (dask worker --nthreads 1, OMP_NUM_THREADS:
            # docs/batch.md): the plugin gives torch their OMP_NUM_THREADS (the nanny's MKL_NUM_THREADS=1
            # would make it 1) and undoes the nanny's malloc setting (WorkerSetup).
            client.register_plugin(WorkerSetup(None), name=WorkerSetup.name)
        else:
            from distributed import Client

            # Its workers run WorkerSetup (torch threads = cores // workers) as they start.
            cluster, _ = local_cluster(args.workers, gpu_ids(args.gpus) if args.gpus else None)
            stack.enter_context(cluster)
            client = stack.enter_context(Client(cluster))
        if "dashboard" in client.scheduler_info().get("services", {}):
            print(f"hrmedseg batch: Dask dashboard at {client.dashboard_link}", file=sys.stderr)
        manifest = run_batch(client, jobs, out, cfg, progress=not args.no_progress)
    counts = manifest.counts()
    print(f"{counts.get('done', 0)} image(s) done, {counts.get('failed', 0)} failed; manifest {manifest.path}")
    return 0 if not counts.get("failed") else 1
