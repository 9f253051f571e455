"""What a Dask worker runs: segment one image (or one region of a slide's boxes) and write it.

Every task gets paths, never pixels: the worker opens the image lazily itself
(:func:`hrmedseg.io.open_image`), so image bytes never pass through the scheduler. Models come
from the worker's cache (:mod:`hrmedseg.batch.worker_cache`), loaded once per worker.

Boxes on a slide larger than ``BatchConfig.region_size`` are split into region tasks (boxes
grouped by the region cell holding their centre); each returns its objects' bit-packed masks and
a final task pastes all of them in box order into one :class:`~hrmedseg.engine.SparseLabels`,
so the result is the same however the slide was split (no seams).

The prompt-free ``semantic`` mode on a slide larger than ``region_size`` is split into tile
tasks, one per ``region_size`` cell: each runs the model calls of
:class:`~hrmedseg.engine.semantic.SemanticPredictor`'s own overlapping tiling whose kept block
starts in its cell (``within``), so every pixel gets the logits of the same model tile as in one
task, and returns its thresholded blocks (foreground bit-packed). The final task assembles them
with :func:`~hrmedseg.engine.semantic.assemble_labels`, which labels connected components over
the whole slide: an object cut by a cell border is one object, as in one task.

The ``auto`` mode is :meth:`BoxPredictor.segment_auto <hrmedseg.engine.BoxPredictor.segment_auto>`
(proposals, then the box model on each proposal's box). On a slide larger than ``region_size``
each cell task runs the proposal tiles that start in its cell (``within``; a tile reads its halo
of context from the neighbours, so an object cut by a cell border is proposed once, by the tile
holding its box centre) and the box model on those proposals; the final task merges what
neighbouring cells both proposed (the same box NMS as over one image), numbers the objects in
raster order and pastes them first-come (``keep_existing``), as ``segment_auto`` does.
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

    mode: "boxes", "semantic" or "auto". model: registry name or weights path (the box model in
    boxes and auto modes, the prompt-free one in semantic mode). model_sha256: digest recorded in
    outputs. output_format: "ome-zarr" or "tiff". region_size: boxes spread over more than this
    many pixels (either axis) are split into region tasks of this size; prompt-free and auto
    images larger than this (either axis) into tile tasks of this size. proposer (auto):
    "nuclei", "grid" or a prompt-free model name/path, as ``segment_auto`` takes it;
    proposer_sha256 its weights' digest. auto_options: an
    :class:`~hrmedseg.engine.auto.AutoOptions` (None: its defaults with ``threshold``).
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
    proposer: str = "nuclei"
    proposer_sha256: str | None = None
    auto_options: Any = None

    def model_record(self) -> dict[str, Any]:
        """The model entry of the manifest and of every object record: weights and their digests."""
        model = {"name": self.model, "sha256": self.model_sha256}
        if self.mode == "auto":
            model.update(proposer=self.proposer, proposer_sha256=self.proposer_sha256)
        return model

    def options(self) -> Any:
        """The auto mode's :class:`~hrmedseg.engine.auto.AutoOptions`."""
        from ..engine.auto import AutoOptions

        return self.auto_options or AutoOptions(threshold=self.threshold)


@dataclass
class PackedObject:
    """One box's mask, bit-packed, as a region task returns it (global box index)."""

    box_index: int
    box: tuple[float, float, float, float]
    region: tuple[int, int, int, int]
    bits: np.ndarray
    score: float


@dataclass
class PackedProposal(PackedObject):
    """An auto cell task's object: its mask as :class:`PackedObject` (``box``: the padded box the
    box model saw; ``box_index``: its rank in the cell), with the proposal's unpadded box and
    score that the final merge of neighbouring cells' proposals needs."""

    proposal_box: tuple[float, float, float, float]
    proposal_score: float


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

    # A worker encodes many crops: a package compiled earlier on this machine (the annotator's)
    # pays for its 1.2 s load; compiling one in every worker would not (aot_cache.aot_mode).
    return cached(f"box:{cfg.model}:{cfg.device}:{cfg.backend}:{cfg.cache_mb}",
                  lambda: BoxPredictor(cfg.model, device=cfg.device, cache_bytes=cfg.cache_mb * 2**20, backend=cfg.backend,
                                       aot="reuse"))


def semantic_predictor(cfg: BatchConfig):
    from ..engine.semantic import NotPromptFreeError, SemanticPredictor

    def build():
        try:
            return SemanticPredictor(cfg.model, device=cfg.device)
        except NotPromptFreeError as err:
            raise InputError(f"--{cfg.mode} needs a prompt-free HRMedSeg model; {cfg.model} is a box-prompt model") from err

    return cached(f"semantic:{cfg.model}:{cfg.device}", build)


def auto_predictors(cfg: BatchConfig):
    """``(BoxPredictor, proposer, loads)`` for the auto mode: the box model and the proposer
    ("grid", or the prompt-free predictor ``segment_auto`` resolves it to), each built once per worker."""
    from ..engine.auto import resolve_proposer

    predictor, loads = box_predictor(cfg)
    if cfg.proposer == "grid":
        return predictor, "grid", loads
    proposer, proposer_loads = cached(f"proposer:{cfg.proposer}:{cfg.device}", lambda: resolve_proposer(cfg.proposer, predictor.device))
    return predictor, proposer, max(loads, proposer_loads)


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


def plan_tiles(shape_yx: tuple[int, int], region_size: int) -> list[tuple[int, int, int, int] | None]:
    """Tile task windows (y0, y1, x0, x1) of a prompt-free image: ``[None]`` (the whole image in
    one task) if it is at most ``region_size`` on both axes, else its ``region_size`` cells, row-major."""
    h, w = shape_yx
    if max(h, w) <= region_size:
        return [None]
    return [(y, min(y + region_size, h), x, min(x + region_size, w)) for y in range(0, h, region_size) for x in range(0, w, region_size)]


def _task_stats(t0: float, loads: int) -> dict[str, Any]:
    return {"seconds": time.perf_counter() - t0, "worker": _worker_name(), "model_loads": loads, "peak_rss_mib": _peak_rss_mib()}


def _image_summary(job: ImageJob, parts: Sequence[dict[str, Any]], t0: float, objects: int, write_s: float) -> dict[str, Any]:
    """The manifest entry of an image whose ``parts`` (region or tile task results) were merged."""
    segment_s = sum(p["seconds"] for p in parts)
    return {"key": job.key, "status": "done", "objects": objects, "regions": len(parts),
            "segment_seconds": round(segment_s, 3), "write_seconds": round(write_s, 3),
            "seconds": round(segment_s + time.perf_counter() - t0, 3),
            "worker": _worker_name(), "region_workers": sorted({p["worker"] for p in parts}),
            "model_loads": max(p["model_loads"] for p in parts),
            "peak_rss_mib": max([p["peak_rss_mib"] for p in parts] + [_peak_rss_mib()])}


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
    return {"objects": objects, "shape_yx": tuple(image.shape_yx), **_task_stats(t0, loads)}


@releases_memory
def finish_boxes(job: ImageJob, cfg: BatchConfig, out: str, *parts: dict[str, Any]) -> dict[str, Any]:
    """Paste every region's objects in box order and write the image's outputs."""
    from ..engine import SparseLabels
    from ..store import ObjectRecord

    t0 = time.perf_counter()
    labels = SparseLabels(parts[0]["shape_yx"])
    objects = sorted((o for p in parts for o in p["objects"]), key=lambda o: o.box_index)
    model = cfg.model_record()
    records = []
    for packed in objects:
        labels.add_packed(packed.region, packed.bits, packed.box_index + 1)  # never unpacked whole
        box = [float(v) for v in packed.box]
        records.append(ObjectRecord(id=packed.box_index + 1, box_xyxy=tuple(box), prompt={"type": "box", "box_xyxy": box},
                                    model=model, score=packed.score))
    write_s = write_image_outputs(Path(out), job, labels, records, cfg.output_format, max_id=max(len(objects), 1))
    return _image_summary(job, parts, t0, len(records), write_s)


@releases_memory
def segment_tile(job: ImageJob, cfg: BatchConfig, within: tuple[int, int, int, int] | None) -> dict[str, Any]:
    """Prompt-free blocks of the model calls owned by ``within`` (None: the whole image).

    ``blocks``: (y0, y1, x0, x1, data): one class, the foreground bit-packed (``np.packbits``
    of the (h, w) block); several, the (h, w) uint8 class block.
    """
    from ..io import open_image

    t0 = time.perf_counter()
    predictor, loads = semantic_predictor(cfg)
    image = open_image(job.image)
    one_class = predictor.num_classes == 1
    blocks = [(y0, y1, x0, x1, np.packbits(b, axis=None) if one_class else b)
              for y0, y1, x0, x1, b in predictor.label_blocks(image, cfg.threshold, within=within)]
    return {"blocks": blocks, "shape_yx": tuple(image.shape_yx), "num_classes": predictor.num_classes,
            "class_names": list(predictor.class_names), **_task_stats(t0, loads)}


def _unpacked(parts: Sequence[dict[str, Any]]):
    for part in parts:
        for y0, y1, x0, x1, data in part["blocks"]:
            if part["num_classes"] == 1:
                data = np.unpackbits(data, count=(y1 - y0) * (x1 - x0)).reshape(y1 - y0, x1 - x0).view(bool)
            yield y0, y1, x0, x1, data


@releases_memory
def finish_prompt_free(job: ImageJob, cfg: BatchConfig, out: str, *parts: dict[str, Any]) -> dict[str, Any]:
    """Assemble every tile's blocks into the image's labels (instances labelled over the whole
    image, so none is cut at a tile border) and write the image's outputs."""
    from ..engine.semantic import assemble_labels
    from ..store import ObjectRecord

    t0 = time.perf_counter()
    num_classes = parts[0]["num_classes"]
    labels = assemble_labels(parts[0]["shape_yx"], num_classes, _unpacked(parts))
    model = cfg.model_record()
    ids = [int(v) for v in np.unique(labels) if v]
    records = [ObjectRecord(id=i, prompt={"type": cfg.mode}, model=model) for i in ids]
    write_s = write_image_outputs(Path(out), job, labels, records, cfg.output_format, max_id=max(ids, default=0),
                                  class_names=None if num_classes == 1 else parts[0]["class_names"])
    return _image_summary(job, parts, t0, len(records), write_s)


@releases_memory
def segment_auto_cell(job: ImageJob, cfg: BatchConfig, within: tuple[int, int, int, int] | None) -> dict[str, Any]:
    """``segment_auto``'s objects proposed by the tiles starting in ``within`` (None: the whole
    image): their packed masks with their proposals' boxes and scores, and timings."""
    from ..engine.auto import cell_proposals, final_masks, padded_raster_order
    from ..io import open_image

    t0 = time.perf_counter()
    predictor, proposer, loads = auto_predictors(cfg)
    options = cfg.options()
    image = open_image(job.image)
    boxes, scores, proposal_masks = cell_proposals(predictor, image, proposer, options, within=within)
    padded, order = padded_raster_order(boxes, image.shape_yx, options.box_pad)
    objects = [
        PackedProposal(rank, tuple(o.box), tuple(o.region), np.packbits(o.mask, axis=None), float(o.score),
                       tuple(float(v) for v in boxes[order[rank]]), float(scores[order[rank]]))
        for rank, o in enumerate(final_masks(predictor, image, padded[order], [proposal_masks[k] for k in order], options))
    ]
    return {"objects": objects, "shape_yx": tuple(image.shape_yx), **_task_stats(t0, loads)}


def merge_cells(parts: Sequence[dict[str, Any]], nms_iou: float) -> list[PackedProposal]:
    """Every cell's objects, those two cells both proposed merged by box NMS on the proposals
    (as over one image; within one cell it changes nothing), in raster order of their boxes."""
    from ..engine.auto import nms_boxes

    objects = [o for p in parts for o in p["objects"]]
    if not objects:
        return []
    keep = nms_boxes(np.array([o.proposal_box for o in objects]), np.array([o.proposal_score for o in objects]), nms_iou)
    kept = [objects[k] for k in keep]
    boxes = np.array([o.box for o in kept])
    return [kept[k] for k in np.lexsort((boxes[:, 0], boxes[:, 1]))]


@releases_memory
def finish_auto(job: ImageJob, cfg: BatchConfig, out: str, *parts: dict[str, Any]) -> dict[str, Any]:
    """Merge the cells' objects, number them 1..N in raster order, paste them first-come
    (an object never takes pixels from one drawn before it) and write the image's outputs."""
    from ..engine import SparseLabels
    from ..store import ObjectRecord

    t0 = time.perf_counter()
    labels = SparseLabels(parts[0]["shape_yx"], overlap="keep_existing")
    model = cfg.model_record()
    records = []
    objects = merge_cells(parts, cfg.options().nms_iou)
    for oid, packed in enumerate(objects, start=1):  # the ids segment_auto gives, so both label images agree
        if not packed.bits.any():  # a grid proposal the box model left empty: no object (its id unused)
            continue
        labels.add_packed(packed.region, packed.bits, oid)
        box = [float(v) for v in packed.box]
        records.append(ObjectRecord(id=oid, box_xyxy=tuple(box), prompt={"type": "auto", "proposer": cfg.proposer, "box_xyxy": box},
                                    model=model, score=packed.score))
    write_s = write_image_outputs(Path(out), job, labels, records, cfg.output_format, max_id=max(len(objects), 1))
    return _image_summary(job, parts, t0, len(records), write_s)


@releases_memory
def segment_image(job: ImageJob, cfg: BatchConfig, out: str) -> dict[str, Any]:
    """One task for one image: segment it in ``cfg.mode`` and write its outputs."""
    if cfg.mode == "boxes":
        return finish_boxes(job, cfg, out, segment_box_region(job, cfg, np.arange(len(read_job_boxes(job)))))
    if cfg.mode == "auto":
        return finish_auto(job, cfg, out, segment_auto_cell(job, cfg, None))
    return finish_prompt_free(job, cfg, out, segment_tile(job, cfg, None))
