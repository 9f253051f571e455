"""Per-object prompts for the engine: a box, clicks, or both, checked against the image.

An object is prompted by an optional box (x0, y0, x1, y1) and an optional list of clicks (x, y)
with labels (1: positive, "this is the object"; 0: negative, "this is not"), all in native image
pixels, plus optionally the low-res logits of an earlier prediction on the same crop (SAM's
``mask_input``). Each object also gets an *extent*: the native box its crop is planned around
and its mask may fill (:func:`~hrmedseg.engine.crops.mask_region`): its box grown to hold its
clicks, or, for an object of clicks alone, a square of ``object_size`` px centred on its
positive clicks (all clicks when it has none), grown to hold them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..io.boxes import check_boxes

POSITIVE, NEGATIVE = 1, 0
# Side (native px) of a clicks-only object's extent when no box gives a scale.
DEFAULT_OBJECT_SIZE = 64.0


@dataclass
class ObjectPrompts:
    """Checked prompts of N objects, native pixels.

    boxes: (N, 4) float64, NaN rows for objects without a box. points: N (P_i, 2) float64 xy
    arrays (P_i may be 0). point_labels: N (P_i,) int arrays of 1 / 0. mask_inputs: N
    (1, h_lr, w_lr) float32 tensors or None. extents: (N, 4) float64 (see the module docstring).
    """

    boxes: np.ndarray
    points: list[np.ndarray]
    point_labels: list[np.ndarray]
    mask_inputs: list[torch.Tensor | None]
    extents: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    def has_box(self, i: int) -> bool:
        return bool(np.isfinite(self.boxes[i]).all())

    def signature(self, i: int) -> tuple[int, bool, bool]:
        """Objects with equal signatures decode in one batch without padding: (clicks, box?, mask?)."""
        return len(self.points[i]), self.has_box(i), self.mask_inputs[i] is not None


def _per_object(values: Any, n: int, name: str) -> list[Any]:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise InputError(f"{name} has {len(values)} entries, but there are {n} objects (one entry per object)")
    return values


def _check_points(points: Any, labels: Any, i: int, shape_yx: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One object's clicks -> ((P, 2) float64 xy, (P,) int labels); InputError naming object ``i``."""
    if points is None:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    try:
        pts = np.asarray(points, np.float64).reshape(-1, 2)
    except ValueError:
        raise InputError(f"points of object {i} must be (P, 2) x, y pairs; got {np.shape(points)}") from None
    lab = np.ones(len(pts), np.int64) if labels is None else np.asarray(labels).reshape(-1)
    if len(lab) != len(pts):
        raise InputError(f"object {i} has {len(pts)} points but {len(lab)} point labels")
    if not np.isin(lab, (POSITIVE, NEGATIVE)).all():
        raise InputError(f"point labels of object {i} must be 1 (positive) or 0 (negative); got {sorted(set(lab.tolist()))}")
    h, w = shape_yx
    for x, y in pts:
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= w and 0 <= y <= h):
            raise InputError(f"point ({x:g}, {y:g}) of object {i} lies outside the image (width {w}, height {h})")
    return pts, lab.astype(np.int64)


def object_extent(box: np.ndarray, points: np.ndarray, labels: np.ndarray, object_size: float, shape_yx) -> np.ndarray:
    """(4,) native extent of one object (module docstring), clipped to the image."""
    h, w = shape_yx
    if np.isfinite(box).all():
        lo, hi = box[:2].copy(), box[2:].copy()
    else:
        anchor = points[labels == POSITIVE] if (labels == POSITIVE).any() else points
        centre = anchor.mean(axis=0)
        lo, hi = centre - object_size / 2, centre + object_size / 2
    if len(points):
        lo, hi = np.minimum(lo, points.min(axis=0) - 0.5), np.maximum(hi, points.max(axis=0) + 0.5)
    return np.clip(np.r_[lo, hi], 0, [w, h, w, h])


def check_prompts(
    boxes: Any,
    shape_yx: tuple[int, int],
    points: Sequence[Any] | None = None,
    point_labels: Sequence[Any] | None = None,
    mask_inputs: Sequence[Any] | None = None,
    object_size: float | None = None,
    source: str = "boxes",
) -> ObjectPrompts:
    """Check the prompts of N objects against an image of ``shape_yx`` (H, W).

    boxes: (N, 4) native xyxy (rows of NaN: no box), or None (every object has clicks only).
    points / point_labels / mask_inputs: None, or one entry per object (None, or that object's
    (P, 2) xy clicks / (P,) labels (default all positive) / (1, h, w) or (h, w) low-res logits).
    object_size: side of a clicks-only object's extent; default the median longest side of the
    boxes given, else :data:`DEFAULT_OBJECT_SIZE`. source: names the boxes in errors. Raises
    InputError naming the bad object (its 0-based position).
    """
    if boxes is None:
        if points is None:
            raise InputError("no prompts: give boxes, points, or both")
        arr = np.full((len(points), 4), np.nan)
    else:
        arr = np.asarray(boxes, np.float64)
        arr = arr[None] if arr.ndim == 1 and arr.shape[0] == 4 else arr
    if arr.ndim != 2 or arr.shape[1] != 4:
        check_boxes(arr, shape_yx, source)  # raises its error naming the shape
    n = len(arr)
    pts_in = _per_object(points, n, "points")
    lab_in = _per_object(point_labels, n, "point_labels")
    masks_in = _per_object(mask_inputs, n, "mask_inputs")
    boxed = ~np.isnan(arr).all(axis=1)
    if boxed.any():
        # A stand-in box in rows without one keeps check_boxes' "box i" the object's position.
        out = check_boxes(np.where(boxed[:, None], arr, [0.0, 0.0, 1.0, 1.0]), shape_yx, source)
        out[~boxed] = np.nan
    else:
        out = arr.copy()
    pts, labs = zip(*[_check_points(p, l, i, shape_yx) for i, (p, l) in enumerate(zip(pts_in, lab_in))]) if n else ((), ())
    for i in range(n):
        if not boxed[i] and not len(pts[i]):
            raise InputError(f"object {i} has neither a box nor points")
    masks = [None if m is None else torch.as_tensor(m, dtype=torch.float32).reshape(1, *np.shape(m)[-2:]) for m in masks_in]
    if object_size is None:
        sides = np.maximum(out[boxed, 2] - out[boxed, 0], out[boxed, 3] - out[boxed, 1])
        object_size = float(np.median(sides)) if len(sides) else DEFAULT_OBJECT_SIZE
    extents = np.array([object_extent(out[i], pts[i], labs[i], object_size, shape_yx) for i in range(n)]).reshape(n, 4)
    return ObjectPrompts(out, list(pts), list(labs), masks, extents)


__all__ = ["DEFAULT_OBJECT_SIZE", "NEGATIVE", "POSITIVE", "ObjectPrompts", "check_prompts", "object_extent"]
