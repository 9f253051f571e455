"""The client side of a batch run: submit the images' tasks, follow them, keep the manifest.

Tasks are submitted once (images already complete are skipped), results are recorded as they
arrive (a failed image gets its error, the others go on), and a worker that dies has its tasks
rerun elsewhere by Dask's scheduler (``distributed.scheduler.allowed-failures``).
"""

from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

from .inputs import ImageJob
from .manifest import Manifest
from .tasks import (BatchConfig, finish_auto, finish_boxes, finish_prompt_free, plan_box_regions, plan_tiles, read_job_boxes,
                    segment_auto_cell, segment_box_region, segment_image, segment_tile)


def model_digest(model: str) -> dict[str, Any]:
    """{"spec", "path", "sha256"} of the model's weights file (digest memoised by file size and time)."""
    from ..models.loading import resolve_spec
    from ..weights.registry import cached_sha256

    path = resolve_spec(model)
    return {"spec": model, "path": str(path), "sha256": cached_sha256(Path(path))}


def _clear_stale_temporaries(out: Path) -> None:
    """Folders an interrupted run left under temporary names (never complete images)."""
    for p in out.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def submit(client: Any, job: ImageJob, cfg: BatchConfig, out: str) -> tuple[Any, list[Any]]:
    """``(image future, region futures)``: one task, or region / tile tasks and a merge for big slides.

    Planning reads box files (boxes) or the image's header (prompt-free: its size), never pixels;
    an unreadable one raises here, before anything is submitted.
    """
    from ..io import image_shape_yx

    # A key of its own per submission: two runs of one image on one client (another --out, a
    # rerun) would otherwise share the key, and Dask hands back the earlier task's result while
    # the scheduler still holds it (released futures are forgotten asynchronously).
    key = f"hrmedseg-{job.key}-{uuid.uuid4().hex[:12]}"
    if cfg.mode == "boxes":
        plan, part, finish = lambda: plan_box_regions(read_job_boxes(job), cfg.region_size), segment_box_region, finish_boxes
    elif cfg.mode == "auto":
        plan, part, finish = lambda: plan_tiles(image_shape_yx(job.image), cfg.region_size), segment_auto_cell, finish_auto
    else:
        plan, part, finish = lambda: plan_tiles(image_shape_yx(job.image), cfg.region_size), segment_tile, finish_prompt_free
    groups = plan()
    if len(groups) > 1:
        regions = [client.submit(part, job, cfg, g, key=f"{key}-region{i}", pure=False) for i, g in enumerate(groups)]
        return client.submit(finish, job, cfg, out, *regions, key=key, pure=False), regions
    return client.submit(segment_image, job, cfg, out, key=key, pure=False), []


def run_batch(client: Any, jobs: Sequence[ImageJob], out: str | Path, cfg: BatchConfig, progress: bool = True) -> Manifest:
    """Segment ``jobs`` on ``client``'s cluster into ``out``; returns the saved manifest."""
    from distributed import as_completed
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(out)
    model = cfg.model_record()
    model["spec"] = model.pop("name")  # the manifest's name for what the user gave
    manifest = Manifest.open(out, cfg.mode, model, cfg.output_format)
    todo = [job for job in jobs if not manifest.is_complete(job)]
    for job in todo:
        manifest.add(job)
    manifest.save()
    skipped = len(jobs) - len(todo)
    if skipped:
        print(f"hrmedseg batch: {skipped} image(s) already complete in {out}, skipped", file=sys.stderr)
    futures: dict[Any, ImageJob] = {}
    region_futures: list[Any] = []
    bar = tqdm(total=len(todo), unit="image", disable=not progress or not todo, file=sys.stderr)
    for job in todo:
        try:
            fut, regions = submit(client, job, cfg, str(out))
        except Exception as err:  # noqa: BLE001 - an unreadable image or box file is that image's error
            _record_failure(manifest, job, err)
            bar.update(1)
            continue
        futures[fut] = job
        region_futures += regions
    region_bar = tqdm(total=len(region_futures), unit="region", disable=not progress or not region_futures, file=sys.stderr)
    for fut in region_futures:
        fut.add_done_callback(lambda _f: region_bar.update(1))
    try:
        for fut in as_completed(list(futures)):
            job = futures.pop(fut)
            if fut.status == "finished":
                manifest.record(job.key, **fut.result(), error=None)
            else:
                _record_failure(manifest, job, fut.exception())
            fut.release()
            manifest.save()
            bar.update(1)
    except KeyboardInterrupt:
        client.cancel(list(futures) + region_futures)
        manifest.save()
        raise
    finally:
        bar.close()
        region_bar.close()
    return manifest


def _record_failure(manifest: Manifest, job: ImageJob, err: BaseException) -> None:
    from tqdm import tqdm

    manifest.record(job.key, status="failed", error=f"{type(err).__name__}: {err}")
    where = "" if str(job.image) in str(err) else f"{job.image}: "
    tqdm.write(f"hrmedseg batch: error: {where}{err}", file=sys.stderr)  # above the progress bar
