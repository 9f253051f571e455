"""What every format shares: the objects of a label image going out, and imported objects coming in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import InputError
from ..store import ImageAnnotation, ObjectRecord, now_iso, objects_from_labels


@dataclass
class ObjectMask:
    """One object of a label image, cut to its box: ``mask`` (h, w) bool whose [0, 0] is at ``offset_yx``."""

    record: ObjectRecord
    mask: np.ndarray
    offset_yx: tuple[int, int]

    @property
    def bbox_xywh(self) -> list[float]:
        """COCO's [x, y, width, height] of the mask's tight box, in pixels."""
        rows, cols = np.nonzero(self.mask.any(1))[0], np.nonzero(self.mask.any(0))[0]
        oy, ox = self.offset_yx
        return [float(ox + cols[0]), float(oy + rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def provenance(record: ObjectRecord) -> dict[str, Any]:
    """hrmedseg's own per-object fields that other tools keep: ``object_id``, ``score``, ``model`` (name), ``edited``."""
    return {"object_id": record.id, "score": record.score, "model": record.model.get("name"), "edited": record.edited}


def labels_2d(annotation: ImageAnnotation) -> np.ndarray:
    """The annotation's (H, W) label image; InputError naming the image when it is nD."""
    labels = np.asarray(annotation.labels)
    if labels.ndim != 2:
        raise InputError(
            f"image '{annotation.image_key}' has labels of shape {labels.shape}: GeoJSON and COCO export take 2D images"
        )
    return labels


def object_masks(annotation: ImageAnnotation) -> Iterator[ObjectMask]:
    """Every object with pixels, in id order; hand-painted ids without a record get one (edited, no box)."""
    from scipy.ndimage import find_objects

    labels = labels_2d(annotation)
    records = {o.id: o for o in objects_from_labels(labels, annotation.objects)}
    for index, window in enumerate(find_objects(labels)):
        if window is None:
            continue
        object_id = index + 1
        yield ObjectMask(records[object_id], labels[window] == object_id, (window[0].start, window[1].start))


@dataclass
class ImportedObject:
    """An object read from another tool's file, before it has an id in a label image."""

    mask: np.ndarray  # (h, w) bool, cut to its box
    offset_yx: tuple[int, int]
    class_name: str | None = None
    object_id: int | None = None  # the id the file gives it, kept when free
    score: float | None = None
    model: dict[str, Any] = field(default_factory=dict)
    edited: bool = True  # made or changed by a person in the other tool, unless the file says otherwise


def paint_objects(
    shape_yx: tuple[int, int], objects: Sequence[ImportedObject], source: str
) -> tuple[np.ndarray, list[ObjectRecord]]:
    """A (H, W) label image and its records from imported objects; later objects are drawn over earlier ones.

    An object keeps the id its file gives it when that id is positive and not taken; the others
    get the next free ids. Objects left with no pixels (outside the image, or hidden under later
    ones) are dropped, so every record has pixels.
    """
    from .. import io as hio

    wanted = {o.object_id for o in objects if o.object_id is not None and o.object_id > 0}
    taken: set[int] = set()
    next_id = 1
    ids: list[int] = []
    for obj in objects:
        if obj.object_id is not None and obj.object_id > 0 and obj.object_id not in taken:
            object_id = obj.object_id
        else:
            while next_id in taken or next_id in wanted:
                next_id += 1
            object_id = next_id
        taken.add(object_id)
        ids.append(object_id)
    labels = np.zeros(shape_yx, hio.label_dtype(max(ids, default=0)))
    for obj, object_id in zip(objects, ids):
        oy, ox = obj.offset_yx
        h, w = obj.mask.shape
        labels[oy : oy + h, ox : ox + w][obj.mask] = object_id
    present = set(np.unique(labels).tolist()) - {0}
    stamp = now_iso()
    records = [
        ObjectRecord(
            id=object_id, prompt={"type": "import", "file": source}, model=dict(obj.model), score=obj.score,
            edited=obj.edited, class_name=obj.class_name, created=stamp, modified=stamp,
        )
        for obj, object_id in zip(objects, ids)
        if object_id in present
    ]
    return labels, sorted(records, key=lambda r: r.id)
