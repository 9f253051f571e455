"""Annotator state, kept apart from Qt and napari (micro-sam style): ids, boxes, provenance, dirty flag.

Also the pure-numpy step that turns a predicted object into the minimal label-image edit, so that
the plugin can write it through ``Labels.data_setitem`` (one undoable step in napari's history).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from hrmedseg.store import ObjectClass, ObjectRecord, new_class, now_iso, object_prompt, prompt_points

#: planes up to this many pixels are scanned whole when an object's old pixels are removed;
#: bigger ones only inside the object's recorded extent (keeps edits on huge images cheap)
FULL_SCAN_PIXELS = 64_000_000

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in full-resolution pixels
Click = tuple[float, float, int]  # x, y in full-resolution pixels; label 1 positive, 0 negative
Region = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


@dataclass
class ModelInfo:
    """Which model made a mask: what the store records and what the dock shows."""

    name: str
    path: str | None = None
    sha256: str | None = None
    untrained: bool = False

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"name": self.name}
        if self.sha256:
            record["sha256"] = self.sha256
        if self.path:
            record["path"] = self.path
        if self.untrained:
            record["untrained"] = True
        return record


@dataclass
class ObjectState:
    """One object: its box prompt and clicks, the slice of an nD image it lives on, and what the model gave.

    ``low_res_logits`` and ``crop`` are the engine's last result for it (``ObjectMask``), fed
    back as SAM's mask prompt on the same crop when a click is added (``use_mask_prompt``).
    """

    id: int
    box: Box | None
    slice_index: tuple[int, ...] = ()
    clicks: list[Click] = field(default_factory=list)
    low_res_logits: Any = field(default=None, repr=False)
    crop: Any = None
    use_mask_prompt: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    # the model's mask (region, bool array) as last written: tells whether a person edited it since
    predicted_region: Region | None = None
    predicted_mask: np.ndarray | None = None
    edited_before: bool = False  # edited in an earlier session (reopened from a store)
    class_name: str | None = None  # one of AnnotatorState.classes, or None (unclassified)
    created: str = field(default_factory=now_iso)
    modified: str = field(default_factory=now_iso)
    pending: bool = False  # a computation for this object is queued or running
    generation: int = 0  # bumped at every new request; stale results are dropped


class AnnotatorState:
    """Plain state of one annotation session on one image (no Qt, no napari, no torch)."""

    def __init__(self) -> None:
        self.objects: dict[int, ObjectState] = {}
        self.model: ModelInfo | None = None
        self.device: str = "auto"
        self.dirty = False
        self._next_id = 1
        self.classes: list[ObjectClass] = []
        self.current_class: str | None = None  # the class new objects get

    # -- classes ----------------------------------------------------------------------------
    def add_class(self, name: str, color: Any = None) -> ObjectClass:
        """Add a class (an existing one of that name is kept as it is) and return it."""
        cls = new_class(name, self.classes, color)
        for known in self.classes:
            if known.name == cls.name:
                return known
        self.classes.append(cls)
        return cls

    def set_class(self, object_ids: Iterable[int], class_name: str | None) -> list[int]:
        """Put existing objects into ``class_name`` (None: unclassified); the ids changed."""
        if class_name is not None and class_name not in {c.name for c in self.classes}:
            raise KeyError(f"no class '{class_name}' (add it first)")
        changed = []
        for oid in object_ids:
            obj = self.objects.get(int(oid))
            if obj is not None and obj.class_name != class_name:
                obj.class_name, obj.modified = class_name, now_iso()
                changed.append(obj.id)
        self.dirty |= bool(changed)
        return changed

    # -- ids ------------------------------------------------------------------------------
    def peek_object_id(self, labels_max: int = 0) -> int:
        """The id the next object will get: above every id in use and in the label image."""
        return max(self._next_id, int(labels_max) + 1, max(self.objects, default=0) + 1)

    def new_object_id(self, labels_max: int = 0) -> int:
        """Take a fresh id (see ``peek_object_id``)."""
        candidate = self.peek_object_id(labels_max)
        self._next_id = candidate + 1
        return candidate

    def add_object(self, box: Box | None, slice_index: tuple[int, ...] = (), labels_max: int = 0) -> ObjectState:
        obj = ObjectState(id=self.new_object_id(labels_max), box=box, slice_index=tuple(slice_index),
                          class_name=self.current_class)
        self.objects[obj.id] = obj
        self.dirty = True
        return obj

    def restore_object(self, record: ObjectRecord, slice_index: tuple[int, ...] = ()) -> ObjectState:
        """Bring back an object saved in a store."""
        obj = ObjectState(
            id=record.id,
            box=record.box_xyxy,
            slice_index=tuple(record.prompt.get("slice", slice_index)),
            clicks=[(float(x), float(y), int(lab)) for (x, y), lab in zip(*prompt_points(record.prompt))],
            model=dict(record.model),
            score=record.score,
            edited_before=record.edited,
            class_name=record.class_name,
            created=record.created,
            modified=record.modified,
        )
        self.objects[obj.id] = obj
        self._next_id = max(self._next_id, obj.id + 1)
        return obj

    def move_box(self, object_id: int, box: Box) -> ObjectState:
        obj = self.objects[object_id]
        obj.box = box
        obj.crop = obj.low_res_logits = None  # another box: another crop, no earlier mask to refine
        obj.modified = now_iso()
        self.dirty = True
        return obj

    def remove_object(self, object_id: int) -> ObjectState | None:
        self.dirty = True
        return self.objects.pop(object_id, None)

    def request(self, object_id: int) -> int:
        """Mark a computation as wanted for this object; returns its generation token."""
        obj = self.objects[object_id]
        obj.generation += 1
        obj.pending = True
        return obj.generation

    def is_current(self, object_id: int, generation: int) -> bool:
        obj = self.objects.get(object_id)
        return obj is not None and obj.generation == generation

    def set_clicks(self, object_id: int, clicks: list[Click]) -> ObjectState:
        """Replace an object's clicks; a click added to the old ones refines the last mask (mask prompt)."""
        obj = self.objects[object_id]
        obj.use_mask_prompt = len(clicks) > len(obj.clicks) and clicks[: len(obj.clicks)] == obj.clicks
        obj.clicks = list(clicks)
        obj.modified = now_iso()
        self.dirty = True
        return obj

    def median_box_side(self) -> float | None:
        """The median longest side of the boxes so far (the scale of an object started by a click)."""
        sides = [max(b[2] - b[0], b[3] - b[1]) for b in (o.box for o in self.objects.values()) if b is not None]
        return float(np.median(sides)) if sides else None

    def record_prediction(self, object_id: int, region: Region, mask: np.ndarray, score: float | None) -> None:
        obj = self.objects[object_id]
        obj.predicted_region = tuple(int(v) for v in region)  # type: ignore[assignment]
        obj.predicted_mask = np.asarray(mask, bool)
        obj.score = None if score is None else float(score)
        obj.model = self.model.to_record() if self.model else {}
        obj.pending = False
        obj.modified = now_iso()
        self.dirty = True

    # -- committing -------------------------------------------------------------------------
    def records(self, labels: np.ndarray) -> list[ObjectRecord]:
        """One record per object id present in ``labels`` (full nD label image, numpy).

        Objects whose pixels were all erased are left out; ids painted by hand without a box get
        a record with prompt {"type": "paint"}. ``edited`` says the mask differs from the model's.
        """
        present = _present_ids(labels)
        records = []
        for oid in sorted(present):
            obj = self.objects.get(oid)
            if obj is None:
                records.append(ObjectRecord(id=oid, prompt={"type": "paint"}, edited=True))
                continue
            prompt = object_prompt(obj.box, [c[:2] for c in obj.clicks], [c[2] for c in obj.clicks], obj.slice_index)
            prompted = obj.box is not None or bool(obj.clicks)
            edited = obj.edited_before or not prompted or not self._matches_prediction(labels, obj)
            records.append(
                ObjectRecord(
                    id=oid,
                    box_xyxy=obj.box,
                    prompt=prompt,
                    model=obj.model,
                    score=obj.score,
                    edited=edited,
                    class_name=obj.class_name,
                    created=obj.created,
                    modified=obj.modified,
                )
            )
        return records

    @staticmethod
    def _matches_prediction(labels: np.ndarray, obj: ObjectState) -> bool:
        if obj.predicted_mask is None or obj.predicted_region is None:
            return True  # restored from a store: compared against nothing new (edited_before holds)
        plane = labels[obj.slice_index] if obj.slice_index else labels
        y0, y1, x0, x1 = obj.predicted_region
        inside = plane[y0:y1, x0:x1] == obj.id
        if not np.array_equal(inside, obj.predicted_mask):
            return False
        return int(np.count_nonzero(plane == obj.id)) == int(np.count_nonzero(inside))

    def mark_saved(self) -> None:
        self.dirty = False


def _present_ids(labels: np.ndarray) -> set[int]:
    return {int(v) for v in np.unique(np.asarray(labels)) if v != 0}


def object_edit(
    plane: np.ndarray,
    object_id: int,
    region: Region | None,
    mask: np.ndarray | None,
    old_extent: Region | None = None,
    overlap: str = "new_wins",
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, Region | None]:
    """The smallest edit of a 2D label plane that replaces object ``object_id`` by a new mask.

    Args:
        plane: (H, W) label plane (read only here).
        object_id: the object to replace (its old pixels become 0 unless the new mask covers them).
        region: (y0, y1, x0, x1) where ``mask`` lies; None with ``mask`` None removes the object.
        mask: (y1 - y0, x1 - x0) bool.
        old_extent: where the object's old pixels can be; None scans the whole plane when it is
            small enough (``FULL_SCAN_PIXELS``).
        overlap: "new_wins" (the new mask overwrites other objects) or "keep_existing".

    Returns:
        ((ys, xs), values, extent): plane indices that change, their new values, and the new
        object's extent (None when it has no pixels).
    """
    h, w = plane.shape[-2:]
    boxes = []
    if plane.size <= FULL_SCAN_PIXELS:
        # find the old pixels wherever a person painted them; edit only their bounding box
        rows = np.flatnonzero((np.asarray(plane) == object_id).any(axis=1))
        if rows.size:
            cols = np.flatnonzero((np.asarray(plane[rows[0] : rows[-1] + 1]) == object_id).any(axis=0))
            boxes.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
    elif old_extent is not None:
        boxes.append(tuple(int(v) for v in old_extent))
    if region is not None:
        boxes.append(tuple(int(v) for v in region))
    boxes = [b for b in boxes if b[1] > b[0] and b[3] > b[2]]
    if not boxes:
        return (np.zeros(0, np.intp), np.zeros(0, np.intp)), np.zeros(0, plane.dtype), None
    y0 = max(0, min(b[0] for b in boxes))
    y1 = min(h, max(b[1] for b in boxes))
    x0 = max(0, min(b[2] for b in boxes))
    x1 = min(w, max(b[3] for b in boxes))
    before = np.asarray(plane[y0:y1, x0:x1])
    after = before.copy()
    after[after == object_id] = 0
    extent = None
    if region is not None and mask is not None:
        ry0, ry1, rx0, rx1 = (int(v) for v in region)
        full = np.zeros(after.shape, bool)
        # clip the region to the plane (a box may reach past the border)
        cy0, cy1, cx0, cx1 = max(ry0, y0), min(ry1, y1), max(rx0, x0), min(rx1, x1)
        if cy1 > cy0 and cx1 > cx0:
            full[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = np.asarray(mask, bool)[
                cy0 - ry0 : cy1 - ry0, cx0 - rx0 : cx1 - rx0
            ]
        if overlap == "keep_existing":
            full &= after == 0
        elif overlap != "new_wins":
            raise ValueError(f"overlap must be 'new_wins' or 'keep_existing', not {overlap!r}")
        after[full] = object_id
        if full.any():
            ys, xs = np.nonzero(full)
            extent = (int(ys.min()) + y0, int(ys.max()) + 1 + y0, int(xs.min()) + x0, int(xs.max()) + 1 + x0)
    changed = np.nonzero(after != before)
    indices = (changed[0] + y0, changed[1] + x0)
    return indices, after[changed], extent


def boxes_from_rectangles(vertices: Iterable[np.ndarray]) -> list[tuple[tuple[int, ...], Box]]:
    """napari rectangle vertex arrays (4, ndim), (..., y, x) -> (leading indices, (x0, y0, x1, y1))."""
    out = []
    for v in vertices:
        v = np.asarray(v, float)
        lead = tuple(int(round(c)) for c in v[0, :-2])
        ys, xs = v[:, -2], v[:, -1]
        out.append((lead, (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))))
    return out


def rectangle_from_box(box: Box, slice_index: tuple[int, ...] = ()) -> np.ndarray:
    """(x0, y0, x1, y1) -> napari rectangle vertices (4, len(slice_index) + 2)."""
    x0, y0, x1, y1 = box
    lead = list(slice_index)
    return np.array([lead + [y0, x0], lead + [y0, x1], lead + [y1, x1], lead + [y1, x0]], float)
