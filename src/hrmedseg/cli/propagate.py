"""``hrmedseg segment STACK --boxes FILE --propagate``: box prompts on some slices of a stack, segmented through it.

    hrmedseg segment stack.tif --boxes boxes.csv --propagate --out labels.tif        # or --out labels.ome.zarr

Each box row names its slice (a ``z``, ``slice`` or ``t`` column; JSON: a key); rows of one
object on several slices share an ``id`` column (default: one object per row, id = row number).
The output is a (Z, H, W) label image: a multi-page TIFF, or an OME-Zarr with axes z, y, x.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..engine.propagation import DEFAULT_MIN_AREA, DEFAULT_MIN_OVERLAP, DEFAULT_MIN_SCORE, PROPAGATION_METHODS

    g = p.add_argument_group("stacks (--propagate)")
    g.add_argument("--propagate", action="store_true", help="STACK has a leading Z/T axis: segment each box's object through it "
                   "(box rows carry a z/slice column; --out .tif or .ome.zarr gets a Z x Y x X label image)")
    g.add_argument("--method", choices=PROPAGATION_METHODS, default="neighbour", help="neighbour (any box model) or sam2 (HRMedSegSAM2 models)")
    g.add_argument("--min-area", type=int, default=DEFAULT_MIN_AREA, help=f"a mask below this many pixels ends an object (default {DEFAULT_MIN_AREA})")
    g.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE, help=f"a predicted IoU below this ends an object (default {DEFAULT_MIN_SCORE})")
    g.add_argument("--min-overlap", type=float, default=DEFAULT_MIN_OVERLAP,
                   help=f"neighbour: an IoU with the neighbour slice's mask below this ends an object (default {DEFAULT_MIN_OVERLAP})")
    g.add_argument("--max-slices", type=int, help="at most this many slices from each box each way (default: no limit)")


def object_ids(path: str, n: int):
    """The ``id`` column of a CSV box file (one object on several slices), else 1..n."""
    import csv

    import numpy as np

    from ..errors import InputError

    text = Path(path).read_text(encoding="utf-8-sig")
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if text.lstrip().startswith(("{", "[")) or "id" not in header:
        return np.arange(1, n + 1)
    col = header.index("id")
    ids = []
    for i, row in enumerate(rows[1:]):
        value = row[col].strip() if col < len(row) else ""
        if not value.isdigit() or int(value) < 1:
            raise InputError(f"box file {path}, line {i + 2}: id {value!r} is not a whole number >= 1")
        ids.append(int(value))
    return np.asarray(ids)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..engine.propagation import SlicePrompt, propagate
    from ..errors import InputError
    from ..io.boxes import read_box_slices
    from ..io.ome_zarr import write_label_image
    from ..io.stacks import open_stack
    from ..io.writers import write_label_stack_tiff
    from .segment import load_predictor

    out = Path(args.out)
    name = out.name.lower()
    if not name.endswith((".tif", ".tiff", ".zarr")):
        raise InputError(f"--out {out}: a propagated stack is written as TIFF (.tif) or OME-Zarr (.ome.zarr)")
    if args.boxes is None or args.points is not None or args.auto:
        raise InputError("--propagate needs --boxes (rows with a z/slice column) and takes neither --points nor --auto")
    channel = None if not args.channel else (args.channel[0] if len(args.channel) == 1 else args.channel)
    stack = open_stack(args.image, channel=channel)
    boxes, slices = read_box_slices(args.boxes)
    ids = object_ids(args.boxes, len(boxes))
    for i, (box, z) in enumerate(zip(boxes, slices)):
        if z >= stack.n_slices:
            raise InputError(f"row {i + 1} of box file {args.boxes}: slice {z} is outside {args.image}, which has {stack.n_slices} slices (0..{stack.n_slices - 1})")
    prompts = [SlicePrompt(int(z), int(oid), box=box) for box, z, oid in zip(boxes, slices, ids)]
    predictor = load_predictor(args)
    bar = tqdm(unit="slice", disable=args.no_progress, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = propagate(predictor, stack, prompts, method=args.method, min_area=args.min_area, min_score=args.min_score,
                           min_overlap=args.min_overlap, max_slices=args.max_slices, progress=progress)
    finally:
        bar.close()
    if name.endswith(".zarr"):
        write_label_image(out, result.labels)
    else:
        write_label_stack_tiff(out, result.labels)
    spans = ", ".join(f"{oid}: {lo}..{hi}" for oid, (lo, hi) in sorted(result.extents.items())[:10])
    print(f"wrote {out} ({stack.n_slices} x {stack.shape_yx[0]} x {stack.shape_yx[1]}, {len(result.extents)} objects; slices {spans})")
    return 0
