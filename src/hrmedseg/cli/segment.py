"""``hrmedseg segment``: segmentation of an image file into a label TIFF.

    hrmedseg segment slide.ome.tif --boxes boxes.csv --out labels.tif [--model NAME|PATH] [--device auto]
    hrmedseg segment slide.ome.tif --boxes boxes.csv --points clicks.csv --out labels.tif
    hrmedseg segment slide.ome.tif --out labels.tif --model PROMPT_FREE_MODEL   # an "hrmedseg" bundle
    hrmedseg segment slide.ome.tif --auto --out labels.tif [--proposer nuclei|grid|MODEL]   # every object, no boxes
    hrmedseg segment stack.tif --boxes boxes.csv --propagate --out labels.tif   # boxes with a z column, through a stack

With boxes: LABELS.tif (tiled, compressed, the image's Y x X shape; box i gets label i + 1) and a
per-object table (id, box, area, score, empty) beside it, both atomically. ``--points`` adds
positive/negative clicks to objects by id (i + 1 for box i; higher ids: objects of clicks alone). With a prompt-free
HRMedSeg model no boxes are needed: one class gives instance labels and a table (id, area),
several classes a class image (class c -> c + 1) and a table (class, name, area). With
``--auto`` a box model segments every object without boxes (``hrmedseg.engine.auto``: proposals
of the prompt-free nuclei model or of a point grid, then the box model on each proposal's box).
Box models keep crop embeddings in the user cache on disk (``hrmedseg cache info|clear``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..engine.predictor import DEFAULT_BOX_MODEL
    from ..models.box_prior import DEFAULT_PRIOR_RULE, PRIOR_RULES

    p = sub.add_parser(
        "segment",
        help="segment the object in each box of an image (any size) into a label TIFF",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("image", help="TIFF/OME-TIFF, OME-Zarr/zarr, PNG or JPEG")
    p.add_argument(
        "--boxes", help="CSV (x0,y0,x1,y1), JSON/GeoJSON rectangles or napari Shapes CSV (not for prompt-free models)"
    )
    p.add_argument(
        "--points", help="CSV/JSON clicks: object id (i + 1 for box i), x, y, label (1 positive, 0 negative); "
        "ids past the boxes are objects of clicks alone"
    )
    p.add_argument("--out", required=True, help="label image to write (.tif)")
    p.add_argument("--objects", help="per-object CSV to write (default: OUT with .objects.csv)")
    p.add_argument("--model", default=DEFAULT_BOX_MODEL, help=f"registry name or weights path (default {DEFAULT_BOX_MODEL})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--channel", type=int, nargs="+", help="channel index(es) to use (1 to 3) of a multichannel image")
    p.add_argument("--overlap", choices=("new_wins", "keep_existing"), default="new_wins", help="who gets pixels claimed twice")
    p.add_argument("--contrast-limits", type=float, nargs=2, metavar=("LO", "HI"), help="map LO..HI to 0..255 (default: percentiles)")
    p.add_argument(
        "--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"),
        help="for uint16/float images: the low and high percentile mapped to 0 and 255 per channel (default 1 99.8, as in training)",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="prompt-free models: foreground probability (default 0.5)")
    p.add_argument("--tile-overlap", type=int, help="prompt-free 'crop' models: tile overlap in pixels (default tile/4)")
    p.add_argument("--max-upscale", type=float, help="largest enlargement of small objects (power of two; default: "
                   "the model's own if its weights record one, else 2)")
    p.add_argument("--batch", type=int, help="boxes per decoder call (default 64 on CUDA, 8 on CPU)")
    p.add_argument(
        "--backend", default="auto", choices=("auto", "fast", "fast-bf16", "onnxruntime", "reference"),
        help="box models: auto (bf16 encoder on GPUs, with CUDA graphs, and on AMX CPUs; exact float32 on other CPUs), fast (exact float32), fast-bf16, onnxruntime (CPU; needs the onnx extra), or reference (plain PyTorch)",
    )
    p.add_argument(
        "--prior", default=None, choices=PRIOR_RULES,
        help="box models: each mask is the model's, the ellipse inscribed in its box, auto: the ellipse where its IoU "
             "with the model's mask is at least the model's predicted IoU, or gate: the one of the two the model's "
             f"fitted prior gate expects to be better (the model's mask when it has none); default {DEFAULT_PRIOR_RULE}",
    )
    p.add_argument("--cache-mb", type=int, default=256, help="embedding cache bound in MiB (4 MiB per crop, 16 MiB for SAM2 models; default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--auto", action="store_true", help="segment every object without boxes (box model on each proposal)")
    p.add_argument("--proposer", default="nuclei", help="--auto: nuclei (the bundled prompt-free model), grid (SAM point grid) or a prompt-free model name/path")
    p.add_argument("--no-disk-cache", action="store_true", help="do not read or write crop embeddings in the user cache")
    from .propagate import add_arguments

    add_arguments(p)
    p.set_defaults(func=run)


def objects_path(out: Path, objects: str | None) -> Path:
    if objects:
        return Path(objects)
    name = out.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(name + ".objects.csv")


def load_predictor(args: argparse.Namespace):
    """The predictor for ``args`` (a separate function so tests can supply a small model)."""
    from ..engine import BoxPredictor, IntensityOptions
    from ..engine.intensity import DEFAULT_INTENSITY

    predictor = BoxPredictor(
        args.model,
        device=args.device,
        cache_bytes=args.cache_mb * 2**20,
        intensity=IntensityOptions(percentiles=tuple(args.percentiles or DEFAULT_INTENSITY.percentiles), contrast_limits=args.contrast_limits),
        decode_batch=args.batch,
        backend=args.backend,
        disk_cache=not getattr(args, "no_disk_cache", False),
        prior=getattr(args, "prior", None),
    )
    # The policy's input size (and any enlargement its weights record) is the model's, set by BoxPredictor.
    if args.max_upscale is not None:
        predictor.policy = dataclasses.replace(predictor.policy, max_upscale=args.max_upscale)
    return predictor


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..engine import SparseLabels
    from ..errors import InputError
    from ..engine.prompts import check_prompts
    from ..io import (
        BoxClippedWarning,
        box_label,
        check_free_space,
        label_tiff_bytes,
        open_image,
        prompts_for_objects,
        read_boxes,
        read_points,
        write_label_tiff,
        write_object_table,
    )

    if getattr(args, "propagate", False):
        from .propagate import run as run_propagate

        return run_propagate(args)
    out = Path(args.out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"--out {out}: the label image is written as TIFF; give a .tif path")
    table = objects_path(out, args.objects)
    channel = None if not args.channel else (args.channel[0] if len(args.channel) == 1 else args.channel)
    image = open_image(args.image, channel=channel)
    # Before any model work: a full disk found after an hour of segmentation loses the hour.
    check_free_space(out, label_tiff_bytes(image.shape_yx, max_id=1))
    if args.auto:
        if args.boxes is not None or args.points is not None:
            raise InputError("--auto finds the objects itself; give --boxes/--points or --auto, not both")
        return run_auto(args, image, out, table)
    if args.boxes is None and args.points is None:
        return run_prompt_free(args, image, out, table)
    boxes = None if args.boxes is None else read_boxes(args.boxes)
    clicks: dict = {}
    if args.points is not None:
        boxes, points, point_labels = prompts_for_objects(boxes, read_points(args.points), f"point file {args.points}")
        clicks = dict(points=points, point_labels=point_labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BoxClippedWarning)
        try:
            check_prompts(boxes, image.shape_yx, source=f"box file {args.boxes}", **clicks)
        except InputError as err:
            if not clicks:
                raise
            raise InputError(f"{err} (object i is id i + 1 in {args.points})") from None
    for w in caught:
        print(f"hrmedseg segment: warning: {w.message}", file=sys.stderr)
    predictor = load_predictor(args)
    labels = SparseLabels(tuple(image.shape_yx), overlap=args.overlap)
    bar = tqdm(total=len(boxes), unit="box", disable=args.no_progress, file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BoxClippedWarning)  # already reported above
            labels, records = predictor.segment(
                image, boxes, labels=labels, overlap=args.overlap, progress=lambda done, total: bar.update(done - bar.n),
                **clicks,
            )
    finally:
        bar.close()
    return write_results(image, out, table, labels, records, source=f"box file {args.boxes}" if args.boxes else f"point file {args.points}")


def write_results(image, out: Path, table: Path, labels, records, source: str) -> int:
    """Label TIFF + per-object table (both atomic), a summary line, a warning for empty masks.

    ``source`` names where the boxes came from, for the warning's "row N of SOURCE".
    """
    from ..io import box_label, write_label_tiff, write_object_table

    write_label_tiff(out, labels, max_id=max((r.id for r in records), default=0))
    write_object_table(table, records)
    empty = [box_label(r.box_index, r.box, source) for r in records if r.empty]
    print(f"wrote {out} ({image.shape_yx[0]} x {image.shape_yx[1]}, {len(records) - len(empty)} objects) and {table}")
    if empty:
        shown = "; ".join(empty[:20]) + (" ..." if len(empty) > 20 else "")
        print(f"hrmedseg segment: warning: {len(empty)} box(es) gave empty masks (listed in {table}): {shown}", file=sys.stderr)
    return 0


def run_auto(args: argparse.Namespace, image, out: Path, table: Path) -> int:
    """``--auto``: every object of the image, proposed then segmented by the box model."""
    from tqdm import tqdm

    from ..engine import SparseLabels

    predictor = load_predictor(args)
    labels = SparseLabels(tuple(image.shape_yx), overlap="keep_existing")
    bar = tqdm(unit="object", disable=args.no_progress, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        labels, records = predictor.segment_auto(image, proposer=args.proposer, labels=labels, progress=progress)
    finally:
        bar.close()
    return write_results(image, out, table, labels, records, source="the automatic proposals")


def load_semantic_predictor(args: argparse.Namespace):
    """The prompt-free predictor for ``args`` (a separate function so tests can supply a model)."""
    from ..engine.intensity import DEFAULT_INTENSITY, IntensityOptions
    from ..engine.semantic import SemanticPredictor

    intensity = DEFAULT_INTENSITY
    if args.percentiles or args.contrast_limits:
        intensity = IntensityOptions(percentiles=tuple(args.percentiles or DEFAULT_INTENSITY.percentiles), contrast_limits=args.contrast_limits)
    return SemanticPredictor(args.model, device=args.device, intensity=intensity, tile_overlap=args.tile_overlap)


def run_prompt_free(args: argparse.Namespace, image, out: Path, table: Path) -> int:
    import csv

    from tqdm import tqdm

    from ..atomic import atomic_path
    from ..engine.semantic import NotPromptFreeError
    from ..errors import InputError
    from ..io import write_label_tiff

    try:
        predictor = load_semantic_predictor(args)  # reads the weights file once
    except NotPromptFreeError as err:
        raise InputError(f"--boxes is required: model {args.model} is a box-prompt model (only prompt-free HRMedSeg "
                         f"models run without boxes)") from err
    bar = tqdm(unit="tile", disable=args.no_progress, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        labels = predictor.segment(image, threshold=args.threshold, progress=progress)
    finally:
        bar.close()
    write_label_tiff(out, labels)
    rows = predictor.table(labels)
    with atomic_path(table) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "area"] if predictor.num_classes == 1 else ["class", "name", "area"])
            writer.writeheader()
            writer.writerows(rows)
    what = f"{len(rows)} objects" if predictor.num_classes == 1 else ", ".join(f"{r['name']} {r['area']} px" for r in rows)
    print(f"wrote {out} ({image.shape_yx[0]} x {image.shape_yx[1]}, {what}) and {table}")
    return 0
