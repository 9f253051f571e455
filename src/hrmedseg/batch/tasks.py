"""What a Dask worker runs: segment one image (or one region of a slide's boxes) and write it.

Every task gets paths, never pixels: the worker opens the image lazily itself
(:func:`hrmedseg.io.open_image`), so image bytes never pass through the scheduler. Models come
from the worker's cache (:mod:`hrmedseg.batch.worker_cache`), loaded once per worker.

Boxes on a slide larger than ``BatchConfig.region_size`` are split into region tasks (boxes
grouped by the region cell holding their centre); each returns its objects' bit-packed masks and
a final task pastes all of them in box order into one :class:`~hrmedseg.engine.SparseLabels`,
so the result is the same however the slide was split (no seams).
"""

from __future__ import annotations

import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .inputs import ImageJob
from .outputs import write_image_outputs
from .worker_cache import cached, releases_memory

MODES = ("boxes", "semantic", "auto")
OUTPUT_FORMATS = ("ome-zarr", "tiff")


@dataclass(frozen=True)
class BatchConfig:
    """Settings shared by all tasks of a run (small and picklable: it travels with each task).

    mode: "boxes", "semantic" or "auto". model: registry name or weights path. model_sha256:
    digest recorded in outputs. output_format: "ome-zarr" or "tiff". region_size: boxes spread
    over more than this many pixels (either axis) are split into region tasks of this size.
    """

    mode: str
    model: str
    model_sha256: str | None = None
    device: str = "auto"
    output_format: str = "ome-zarr"
    threshold: float = 0.5
    region_size: int = 8192
    # No embedding cache: a task encodes each crop once for all its boxes, and region tasks of a
    # slide never share crops, so cached embeddings would only add to a worker's memory.
    cache_mb: int = 0
    backend: str = "auto"


@dataclass
class PackedObject:
    """One box's mask, bit-packed, as a region task returns it (global box index)."""

    box_index: int
    box: tuple[float, float, float, float]
    region: tuple[int, int, int, int]
    bits: np.ndarray
    score: float


def _worker_name() -> str:
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:
        return "local"


def _peak_rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


def box_predictor(cfg: BatchConfig):
    from ..engine import BoxPredictor

    return cached(f"box:{cfg.model}:{cfg.device}:{cfg.backend}:{cfg.cache_mb}",
                  lambda: BoxPredictor(cfg.model, device=cfg.device, cache_bytes=cfg.cache_mb * 2**20, backend=cfg.backend))


def semantic_predictor(cfg: BatchConfig):
    from ..engine.semantic import NotPromptFreeError, SemanticPredictor

    def build():
        try:
            return SemanticPredictor(cfg.model, device=cfg.device)
        except NotPromptFreeError as err:
            raise InputError(f"--{cfg.mode} needs a prompt-free HRMedSeg model; {cfg.model} is a box-prompt model") from err

    return cached(f"semantic:{cfg.model}:{cfg.device}", build)


def auto_instances(predictor: Any, image: Any, threshold: float) -> np.ndarray:
    """Automatic instances: connected components of a one-class prompt-free model's mask.

    (H, W) int32, ids 1..N. Stands in for the annotators' ``segment_auto`` until it lands:
    swapping it in means changing this function only.
    """
    if predictor.num_classes != 1:
        raise InputError(f"--auto needs a one-class (nuclei-like) prompt-free model; {predictor.source} has {predictor.num_classes} classes")
    return predictor.segment(image, threshold=threshold)


def read_job_boxes(job: ImageJob) -> np.ndarray:
    """(N, 4) boxes of ``job`` (xyxy); an image without a box file is an error naming it."""
    from ..io import read_boxes

    if job.points:
        raise InputError(f"{job.image}: point prompts ({job.points}) are not supported yet; give boxes")
    if not job.boxes:
        raise InputError(f"{job.image}: no box file (give --boxes FILE|FOLDER or a 'boxes' column in the image list)")
    return read_boxes(job.boxes)


def plan_box_regions(boxes: np.ndarray, region_size: int) -> list[np.ndarray]:
    """Box indices per region task: one group if the boxes span at most ``region_size`` pixels,
    else one group per ``region_size`` cell holding box centres (row-major, empty cells dropped)."""
    if len(boxes) == 0:
        return [np.arange(0)]
    span = boxes[:, 2:].max(0) - boxes[:, :2].min(0)
    if span.max() <= region_size:
        return [np.arange(len(boxes))]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    cells = np.floor(centres[:, ::-1] / region_size).astype(np.int64)  # (row, col)
    order = np.lexsort((cells[:, 1], cells[:, 0]))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in order:
        groups.setdefault((int(cells[i, 0]), int(cells[i, 1])), []).append(int(i))
    return [np.asarray(g) for g in groups.values()]


@releases_memory
def segment_box_region(job: ImageJob, cfg: BatchConfig, indices: Sequence[int]) -> dict[str, Any]:
    """Segment the boxes ``indices`` of ``job``'s image; returns their packed masks and timings."""
    from ..io import BoxClippedWarning, check_boxes, open_image

    t0 = time.perf_counter()
    predictor, loads = box_predictor(cfg)
    image = open_image(job.image)
    boxes = read_job_boxes(job)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoxClippedWarning)
        check_boxes(boxes, image.shape_yx, source=f"boxes in {job.boxes}")
        indices = np.asarray(indices, np.int64)
        objects = [
            PackedObject(int(indices[o.box_index]), tuple(o.box), tuple(o.region), np.packbits(o.mask, axis=None), float(o.score))
            for o in predictor.predict_boxes(image, boxes[indices])
        ]
    return {"objects": objects, "shape_yx": tuple(image.shape_yx), "seconds": time.perf_counter() - t0,
            "worker": _worker_name(), "model_loads": loads, "peak_rss_mib": _peak_rss_mib()}


@releases_memory
def finish_boxes(job: ImageJob, cfg: BatchConfig, out: str, *parts: dict[str, Any]) -> dict[str, Any]:
    """Paste every region's objects in box order and write the image's outputs."""
    from ..engine import SparseLabels
    from ..store import ObjectRecord

    t0 = time.perf_counter()
    labels = SparseLabels(parts[0]["shape_yx"])
    objects = sorted((o for p in parts for o in p["objects"]), key=lambda o: o.box_index)
    model = {"name": cfg.model, "sha256": cfg.model_sha256}
    records = []
    for packed in objects:
        labels.add_packed(packed.region, packed.bits, packed.box_index + 1)  # never unpacked whole
        box = [float(v) for v in packed.box]
        records.append(ObjectRecord(id=packed.box_index + 1, box_xyxy=tuple(box), prompt={"type": "box", "box_xyxy": box},
                                    model=model, score=packed.score))
    write_s = write_image_outputs(Path(out), job, labels, records, cfg.output_format, max_id=max(len(objects), 1))
    return {"key": job.key, "status": "done", "objects": len(records), "regions": len(parts),
            "segment_seconds": round(sum(p["seconds"] for p in parts), 3), "write_seconds": round(write_s, 3),
            "seconds": round(sum(p["seconds"] for p in parts) + time.perf_counter() - t0, 3),
            "worker": _worker_name(), "region_workers": sorted({p["worker"] for p in parts}),
            "model_loads": max(p["model_loads"] for p in parts),
            "peak_rss_mib": max([p["peak_rss_mib"] for p in parts] + [_peak_rss_mib()])}


@releases_memory
def segment_image(job: ImageJob, cfg: BatchConfig, out: str) -> dict[str, Any]:
    """One task for one image: segment it in ``cfg.mode`` and write its outputs."""
    if cfg.mode == "boxes":
        return finish_boxes(job, cfg, out, segment_box_region(job, cfg, np.arange(len(read_job_boxes(job)))))
    from ..io import open_image
    from ..store import ObjectRecord

    t0 = time.perf_counter()
    predictor, loads = semantic_predictor(cfg)
    image = open_image(job.image)
    if cfg.mode == "auto":
        labels = auto_instances(predictor, image, cfg.threshold)
    else:
        labels = predictor.segment(image, threshold=cfg.threshold)
    segment_s = time.perf_counter() - t0
    model = {"name": cfg.model, "sha256": cfg.model_sha256}
    ids = [int(v) for v in np.unique(labels) if v]
    records = [ObjectRecord(id=i, prompt={"type": cfg.mode}, model=model) for i in ids]
    write_s = write_image_outputs(Path(out), job, labels, records, cfg.output_format, max_id=max(ids, default=0),
                                  class_names=None if predictor.num_classes == 1 else predictor.class_names)
    return {"key": job.key, "status": "done", "objects": len(records), "regions": 1, "segment_seconds": round(segment_s, 3),
            "write_seconds": round(write_s, 3), "seconds": round(time.perf_counter() - t0, 3), "worker": _worker_name(),
            "model_loads": loads, "peak_rss_mib": _peak_rss_mib()}
