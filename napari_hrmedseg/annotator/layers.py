"""Binding an image layer's boxes (Shapes) and masks (Labels) layers to its annotation state.

``LayerBinding`` adds (or reuses) '<image> boxes' and '<image> masks', turns rectangles drawn,
moved or deleted in the boxes layer into objects of an ``AnnotatorState``, and writes masks into
the labels layer with ``Labels.data_setitem``, so each mask is one step of napari's undo history.
It does not compute masks: it says which objects need one (``objects_changed``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
from psygnal import Signal

from hrmedseg.store import ImageAnnotation

from .._layer_image import spatial_shape
from .._state import AnnotatorState, boxes_from_rectangles, object_edit, rectangle_from_box

MIN_BOX_SIDE = 2.0  # pixels; smaller rectangles (a click without a drag) prompt nothing
OBJECT_ID = "object_id"
UNTRAINED_SUFFIX = " [UNTRAINED WEIGHTS]"
#: label images up to this size are scanned for their largest id (bigger ones: too slow on the UI thread)
LABELS_MAX_SCAN = 64_000_000


class LayerBinding:
    """The boxes and masks layers of one image layer at a time, and that image's ``AnnotatorState``.

    Signals (psygnal, on the UI thread): ``objects_changed(list)`` with the ids of objects whose
    box is new or moved (they need a mask); ``objects_removed(list)`` with the ids of objects
    whose box was deleted (their masks are already erased); ``painted(list)`` with the history
    atoms of an edit a person made in the masks layer (paint, erase, fill; not the annotator's
    own writes, which go through :meth:`writing`).
    """

    objects_changed = Signal(list)
    objects_removed = Signal(list)
    painted = Signal(list)

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.state = AnnotatorState()
        self.image_layer: Any = None
        self.boxes_layer: Any = None
        self.labels_layer: Any = None
        self.overlap = "new_wins"
        self._reconciling = False
        self._writing = False
        self._extents: dict[int, tuple[int, int, int, int]] = {}

    # ------------------------------------------------------------------ binding
    def bind(self, layer: Any) -> None:
        """Annotate ``layer`` (None: nothing) with a fresh state; the model choice carries over."""
        self._disconnect()
        self.image_layer = layer
        self._fresh_state()
        self._extents.clear()
        if layer is None:
            self.boxes_layer = self.labels_layer = None
            return
        shape = spatial_shape(layer)
        ndim = len(shape)
        geometry = {"scale": tuple(layer.scale)[-ndim:], "translate": tuple(layer.translate)[-ndim:]}
        labels_name, boxes_name = f"{layer.name} masks", f"{layer.name} boxes"
        existing = {lyr.name: lyr for lyr in self.viewer.layers}
        labels = existing.get(labels_name)
        if labels is None or tuple(labels.data.shape) != shape:
            labels = self.viewer.add_labels(np.zeros(shape, np.uint32), name=labels_name, **geometry)
        boxes = existing.get(boxes_name)
        if boxes is None or boxes.ndim != ndim:
            boxes = self.viewer.add_shapes(
                ndim=ndim,
                name=boxes_name,
                shape_type="rectangle",
                edge_color="#ffd700",
                face_color="transparent",
                edge_width=max(1.0, max(shape[-2:]) / 400),
                features={OBJECT_ID: np.zeros(0, int)},
                feature_defaults={OBJECT_ID: 0},
                text={"string": "{object_id}", "color": "#ffd700", "anchor": "upper_left", "size": 9},
                **geometry,
            )
        self.labels_layer, self.boxes_layer = labels, boxes
        # boxes already drawn (or restored) become objects
        if len(boxes.data):
            self.reconcile()
        boxes.events.data.connect(self._on_boxes_data)
        labels.events.paint.connect(self._on_paint)
        self.start_boxes()
        self.show_model()

    def _fresh_state(self) -> None:
        old = self.state
        self.state = AnnotatorState()
        # the model and the classes belong to the session, not to one image
        self.state.model, self.state.classes, self.state.current_class = old.model, old.classes, old.current_class

    def _disconnect(self) -> None:
        if self.boxes_layer is not None:
            self.boxes_layer.events.data.disconnect(self._on_boxes_data)
        if self.labels_layer is not None:
            self.labels_layer.events.paint.disconnect(self._on_paint)

    def start_boxes(self) -> None:
        """Select the boxes layer in rectangle mode, ready to draw the next object."""
        if self.boxes_layer is None:
            return
        self.boxes_layer.selected_data = set()
        self.viewer.layers.selection.active = self.boxes_layer
        self.boxes_layer.mode = "add_rectangle"

    def show_model(self) -> None:
        """Name the masks layer after the image, marked when the model (``state.model``) is untrained."""
        if self.labels_layer is None or self.image_layer is None:
            return
        untrained = self.state.model is not None and self.state.model.untrained
        self.labels_layer.name = f"{self.image_layer.name} masks" + (UNTRAINED_SUFFIX if untrained else "")

    # ------------------------------------------------------------------ boxes -> objects
    def _on_boxes_data(self, event: Any) -> None:
        if str(getattr(event, "action", "")) in ("added", "removed", "changed"):
            self.reconcile()

    def _on_paint(self, event: Any = None) -> None:
        self.state.dirty = True
        if not self._writing:  # napari emits ``paint`` for every history step, ours included
            self.painted.emit(list(getattr(event, "value", None) or []))

    @contextmanager
    def writing(self) -> Iterator[None]:
        """While the annotator itself writes into the masks layer: its ``paint`` events are no edit of a person's."""
        before, self._writing = self._writing, True
        try:
            yield
        finally:
            self._writing = before

    def add_box(self, box: Any, slice_index: tuple[int, ...]) -> int:
        """Draw ``box`` (xyxy) on plane ``slice_index`` as if a person had: a new object (its mask
        is asked for through ``objects_changed``); returns its id."""
        self.boxes_layer.add_rectangles([rectangle_from_box(tuple(float(v) for v in box), tuple(slice_index))])
        return int(self._box_ids()[-1])

    def selected_ids(self) -> list[int]:
        """Object ids of the boxes selected with the select tool in the boxes layer.

        While drawing (rectangle mode) napari keeps the last box drawn selected: that is no choice
        a person made, so it counts as none.
        """
        if self.boxes_layer is None or str(self.boxes_layer.mode) not in ("select", "direct"):
            return []
        ids = self._box_ids()
        return [int(ids[i]) for i in sorted(self.boxes_layer.selected_data) if i < len(ids) and ids[i] > 0]

    def _box_ids(self) -> np.ndarray:
        feats = self.boxes_layer.features
        if OBJECT_ID not in feats:
            feats[OBJECT_ID] = 0
        return np.asarray(feats[OBJECT_ID].fillna(0), dtype=np.int64)

    def reconcile(self) -> None:
        """Compare the Shapes layer with the known objects: new, moved and deleted boxes."""
        if self._reconciling or self.boxes_layer is None:
            return
        self._reconciling = True
        try:
            layer = self.boxes_layer
            ids = self._box_ids()
            seen: set[int] = set()
            assigned = False
            to_compute: list[int] = []
            for i, (vertices, shape_type) in enumerate(zip(layer.data, layer.shape_type)):
                if shape_type != "rectangle":
                    continue
                (lead, box), = boxes_from_rectangles([vertices])
                if box[2] - box[0] < MIN_BOX_SIDE or box[3] - box[1] < MIN_BOX_SIDE:
                    continue
                lead = self._clip_lead(lead)
                oid = int(ids[i])
                obj = self.state.objects.get(oid)
                if oid <= 0 or obj is None or oid in seen:  # new box (or a pasted copy of one)
                    obj = self.state.add_object(box, lead, labels_max=self.labels_max())
                    layer.features.loc[layer.features.index[i], OBJECT_ID] = obj.id
                    assigned = True
                    to_compute.append(obj.id)
                elif obj.box is None or not np.allclose(obj.box, box) or obj.slice_index != lead:
                    old_lead = obj.slice_index
                    self.state.move_box(oid, box)
                    if old_lead != lead:  # moved to another slice: erase it on the old one
                        self.write(oid, None, None, slice_index=old_lead)
                        obj.slice_index = lead
                    to_compute.append(oid)
                seen.add(obj.id)
            gone = [oid for oid, obj in self.state.objects.items() if obj.box is not None and oid not in seen]
            for oid in gone:
                obj = self.state.remove_object(oid)
                self.write(oid, None, None, slice_index=obj.slice_index if obj else ())
            if gone:
                self.objects_removed.emit(gone)
            if assigned:
                layer.refresh_text()
            if to_compute:
                self.objects_changed.emit(to_compute)
        finally:
            self._reconciling = False

    def _clip_lead(self, lead: tuple[int, ...]) -> tuple[int, ...]:
        shape = spatial_shape(self.image_layer)
        return tuple(min(max(int(i), 0), n - 1) for i, n in zip(lead, shape[:-2]))

    def labels_max(self) -> int:
        """The largest id in the masks layer (0 for label images too big to scan)."""
        data = self.labels_layer.data
        if data.size <= LABELS_MAX_SCAN:
            return int(np.max(data)) if data.size else 0
        return 0

    # ------------------------------------------------------------------ masks
    def write(self, object_id: int, region, mask, slice_index: tuple[int, ...] = ()) -> None:
        """Replace object ``object_id`` on its plane by ``mask`` (None: remove it); one undo step."""
        layer = self.labels_layer
        if layer is None:
            return
        plane = layer.data[slice_index] if slice_index else layer.data
        (ys, xs), values, extent = object_edit(
            plane, object_id, region, mask, old_extent=self._extents.get(object_id), overlap=self.overlap
        )
        if extent is None:
            self._extents.pop(object_id, None)
        else:
            self._extents[object_id] = extent
        if ys.size == 0:
            return
        lead = tuple(np.full(ys.shape, i, dtype=np.intp) for i in slice_index)
        with self.writing(), layer.block_history():
            layer.data_setitem(lead + (ys, xs), values.astype(layer.data.dtype))
        self.state.dirty = True

    def remove_all_boxes(self) -> None:
        """Delete every box (each object's mask goes with it, through ``reconcile``)."""
        if self.boxes_layer is not None and len(self.boxes_layer.data):
            self.boxes_layer.selected_data = set(range(len(self.boxes_layer.data)))
            self.boxes_layer.remove_selected()

    def restore(self, annotation: ImageAnnotation) -> None:
        """Show a saved annotation: its labels, and one box per boxed object (a fresh, clean state)."""
        self._reconciling = True  # the boxes added here are the restored objects, not new ones
        try:
            self.boxes_layer.data = []
            self._fresh_state()
            self.labels_layer.data = annotation.labels.astype(np.uint32, copy=False)
            rects, ids = [], []
            for record in annotation.objects:
                obj = self.state.restore_object(record)
                if obj.box is not None:
                    rects.append(rectangle_from_box(obj.box, obj.slice_index))
                    ids.append(obj.id)
            if rects:
                self.boxes_layer.add_rectangles(rects)
                self.boxes_layer.features[OBJECT_ID] = np.asarray(ids, dtype=np.int64)
                self.boxes_layer.refresh_text()
        finally:
            self._reconciling = False
        self.state.dirty = False
