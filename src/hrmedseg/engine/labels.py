"""Objects (one box's mask in its own small region) and writing them into label images.

Overlap policy, when a new object's mask covers pixels that already carry a label:
- ``"new_wins"`` (default): the new object takes those pixels (the last box wins);
- ``"keep_existing"``: existing labels stay; the new object gets only unlabelled pixels.
Either way only ``obj.region`` of the label image is read and written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OVERLAP_POLICIES = ("new_wins", "keep_existing")


@dataclass
class ObjectMask:
    """One object's result.

    box: the (clipped) box, xyxy native pixels (for an object of clicks alone, ``has_box``
    False, its extent: the window its mask may fill). region: (y0, y1, x0, x1) native pixels.
    mask: bool array of the region's shape. score: the decoder's predicted IoU.
    empty: the mask has no pixel. box_index: position of the object in the call's input.
    crop, level: the crop it was decoded in and the pyramid level read. points (P, 2) native
    xy and point_labels (P,): its clicks. low_res_logits: (1, h_lr, w_lr) float32 CPU logits
    over the crop's input square (what the mask was thresholded from), to pass back as
    ``mask_inputs`` with ``crops=[crop]`` when the object is refined.
    """

    box: tuple[float, float, float, float]
    region: tuple[int, int, int, int]
    mask: np.ndarray
    score: float
    box_index: int = 0
    crop: Any = None
    level: int = 0
    has_box: bool = True
    points: Any = None
    point_labels: Any = None
    low_res_logits: Any = field(default=None, repr=False)

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class ObjectRecord:
    """A row of the per-object table: ``area`` is the object's pixel count in the label image
    after all overlaps were resolved (0 for empty masks, which keep their id in the table)."""

    id: int
    box_index: int
    box: tuple[float, float, float, float]
    region: tuple[int, int, int, int]
    area: int
    score: float
    empty: bool
    note: str = ""


def _check_policy(overlap: str) -> None:
    if overlap not in OVERLAP_POLICIES:
        raise ValueError(f"overlap must be one of {OVERLAP_POLICIES}, got {overlap!r}")


def paste_object(labels: Any, obj: ObjectMask, object_id: int, overlap: str = "new_wins") -> int:
    """Write ``object_id`` where ``obj.mask`` is set, touching only ``obj.region`` of ``labels``.

    ``labels`` is any 2D array-like supporting slicing reads and writes (numpy, memmap, zarr).
    Returns the number of pixels written.
    """
    _check_policy(overlap)
    y0, y1, x0, x1 = obj.region
    if obj.mask.shape != (y1 - y0, x1 - x0):
        raise ValueError(f"mask shape {obj.mask.shape} does not match region {obj.region}")
    if not obj.mask.any():
        return 0
    window = np.array(labels[y0:y1, x0:x1])
    write = obj.mask if overlap == "new_wins" else obj.mask & (window == 0)
    window[write] = object_id
    labels[y0:y1, x0:x1] = window
    return int(write.sum())


def _unpack_rows(packed: np.ndarray, width: int, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` (bool, (r1 - r0, width)) of a mask bit-packed row-major with ``np.packbits``.

    Only the bytes of those rows are unpacked: a window of a huge object costs the window, not the object.
    """
    start, stop = r0 * width, r1 * width
    b0 = start // 8
    bits = np.unpackbits(packed[b0 : -(-stop // 8)])
    return bits[start - 8 * b0 : stop - 8 * b0].reshape(r1 - r0, width).view(bool)


@dataclass
class SparseLabels:
    """A label image kept as its objects (bit-packed masks): for images too big to hold.

    ``read(y0, y1, x0, x1)`` renders any window (what :func:`hrmedseg.io.write_label_tiff`
    calls tile by tile), applying the overlap policy in paste order.
    """

    shape_yx: tuple[int, int]
    overlap: str = "new_wins"
    bucket: int = 1024
    _objects: list = field(default_factory=list)
    _buckets: dict = field(default_factory=dict)
    max_id: int = 0

    def __post_init__(self) -> None:
        _check_policy(self.overlap)

    def add(self, obj: ObjectMask, object_id: int) -> None:
        if obj.empty:
            return
        self.add_packed(obj.region, np.packbits(obj.mask, axis=None), object_id)

    def add_packed(self, region: tuple[int, int, int, int], packed: np.ndarray, object_id: int) -> None:
        """Add an object whose mask over ``region`` (y0, y1, x0, x1) is already bit-packed
        row-major (``np.packbits(mask, axis=None)``), without unpacking it."""
        y0, y1, x0, x1 = (int(v) for v in region)
        shape = (y1 - y0, x1 - x0)
        if len(packed) != -(-shape[0] * shape[1] // 8):
            raise ValueError(f"{len(packed)} packed bytes do not hold a mask of region {region}")
        if y1 <= y0 or x1 <= x0 or not packed.any():
            return
        k = len(self._objects)
        self._objects.append(((y0, y1, x0, x1), packed, shape, int(object_id)))
        for by in range(y0 // self.bucket, (y1 - 1) // self.bucket + 1):
            for bx in range(x0 // self.bucket, (x1 - 1) // self.bucket + 1):
                self._buckets.setdefault((by, bx), []).append(k)
        self.max_id = max(self.max_id, int(object_id))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.zeros((y1 - y0, x1 - x0), np.uint32 if self.max_id >= 2**16 else np.uint16)
        hits: set[int] = set()
        for by in range(y0 // self.bucket, (y1 - 1) // self.bucket + 1):
            for bx in range(x0 // self.bucket, (x1 - 1) // self.bucket + 1):
                hits.update(self._buckets.get((by, bx), ()))
        for k in sorted(hits):
            (ry0, ry1, rx0, rx1), packed, shape, oid = self._objects[k]
            iy0, iy1, ix0, ix1 = max(y0, ry0), min(y1, ry1), max(x0, rx0), min(x1, rx1)
            if iy0 >= iy1 or ix0 >= ix1:
                continue
            m = _unpack_rows(packed, shape[1], iy0 - ry0, iy1 - ry0)[:, ix0 - rx0 : ix1 - rx0]
            win = out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            if self.overlap == "keep_existing":
                m = m & (win == 0)
            win[m] = oid
        return out

    def areas(self) -> dict[int, int]:
        """{object id: pixels it holds in the rendered label image}."""
        return {oid: int((self.read(*region) == oid).sum()) for region, _, _, oid in self._objects}
