"""Clicks on top of boxes: an image layer's '<image> clicks' Points layer bound to its objects.

``ClickBinding`` adds (or reuses) the Points layer beside the boxes and masks of a
``LayerBinding``. Each point added there is a click on one object, stored in the point's
features (``object_id``, ``label``: 1 positive, 0 negative):

- its object is the one under the cursor (its mask, else the smallest box holding the click),
  else the selected object (the last one drawn or clicked; ``select(None)`` clears it), else a
  new object prompted by clicks alone (a negative click cannot start one and is dropped);
- a click on a plane where an object's mask lies but that object is prompted on another plane
  (a mask propagated through a stack) goes to the object ``elsewhere(object_id, plane)`` names
  (the annotator: a correction of that object on this plane); without ``elsewhere`` it is
  treated as a click off every object (a click holds no plane: it must not refine the object
  on its own plane);
- it is negative when Alt is held on the press, or while ``negative`` is set (the dock's toggle).

Adding, moving or deleting points updates the objects' clicks in the ``AnnotatorState`` and
emits ``clicks_changed`` with the ids that need a new mask; a clicks-only object whose last click
is deleted is removed (``objects_removed``, its mask erased). It does not compute masks.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from psygnal import Signal

from .._layer_image import spatial_shape
from .._state import Click
from .layers import OBJECT_ID, LayerBinding

LABEL = "label"
POSITIVE_COLOR, NEGATIVE_COLOR = "#00e060", "#ff3050"


class ClickBinding:
    """The clicks layer of the image a ``LayerBinding`` is bound to.

    Signals (psygnal, on the UI thread): ``clicks_changed(list)`` with the ids of objects whose
    clicks changed; ``objects_removed(list)`` with the ids of clicks-only objects that lost
    their last click (their masks are already erased).
    """

    clicks_changed = Signal(list)
    objects_removed = Signal(list)

    def __init__(self, layers: LayerBinding) -> None:
        self.layers = layers
        self.points_layer: Any = None
        self.negative = False  # the dock's toggle: every click negative
        self.selected: int | None = None
        # (object id under a click, the click's plane) -> the object on that plane that takes it, or None
        self.elsewhere: Callable[[int, tuple[int, ...]], int | None] | None = None
        self._reconciling = False

    @property
    def state(self):
        return self.layers.state

    # ------------------------------------------------------------------ binding
    def bind(self) -> None:
        """Add (or reuse) '<image> clicks' for the image ``layers`` is bound to (None: nothing)."""
        self._disconnect()
        self.selected = None
        image = self.layers.image_layer
        if image is None:
            self.points_layer = None
            return
        ndim = len(spatial_shape(image))
        name = f"{image.name} clicks"
        layer = next((lyr for lyr in self.layers.viewer.layers if lyr.name == name and lyr.ndim == ndim), None)
        if layer is None:
            layer = self.layers.viewer.add_points(
                np.zeros((0, ndim)),
                ndim=ndim,
                name=name,
                size=max(3.0, max(spatial_shape(image)[-2:]) / 80),
                border_color="white",
                features={OBJECT_ID: np.zeros(0, int), LABEL: np.zeros(0, int)},
                feature_defaults={OBJECT_ID: 0, LABEL: 1},
                scale=tuple(image.scale)[-ndim:],
                translate=tuple(image.translate)[-ndim:],
            )
        self.points_layer = layer
        layer.data = np.zeros((0, ndim))  # a fresh state: clicks come from it (restore) or from the user
        layer.events.data.connect(self._on_data)
        layer.mouse_drag_callbacks.insert(0, self._on_press)  # before the add mode's own callback
        self.layers.viewer.layers.selection.active = self.layers.boxes_layer

    def _disconnect(self) -> None:
        if self.points_layer is not None:
            self.points_layer.events.data.disconnect(self._on_data)
            if self._on_press in self.points_layer.mouse_drag_callbacks:
                self.points_layer.mouse_drag_callbacks.remove(self._on_press)

    def start_clicks(self) -> None:
        """Select the clicks layer in add mode, ready for the next click."""
        if self.points_layer is not None:
            self.layers.viewer.layers.selection.active = self.points_layer
            self.points_layer.mode = "add"

    def select(self, object_id: int | None) -> None:
        """The object a click off every object goes to (None: such a click starts a new object)."""
        self.selected = object_id

    # ------------------------------------------------------------------ events
    def _on_press(self, layer: Any, event: Any) -> None:
        negative = self.negative or "Alt" in set(getattr(event, "modifiers", ()) or ())
        # napari copies a selected point's features into the defaults: a new click starts unassigned
        layer.feature_defaults = {OBJECT_ID: 0, LABEL: 0 if negative else 1}

    def _on_data(self, event: Any) -> None:
        if str(getattr(event, "action", "")) in ("added", "removed", "changed"):
            self.reconcile()

    def _owner(self, lead: tuple[int, ...], x: float, y: float) -> int | None:
        """The object a new click at (x, y) on plane ``lead`` belongs to, if any (module docstring)."""
        labels = self.layers.labels_layer.data
        shape = spatial_shape(self.layers.image_layer)
        r, c = int(np.floor(y)), int(np.floor(x))
        if 0 <= r < shape[-2] and 0 <= c < shape[-1]:
            under = int(labels[lead + (r, c)])
            if under in self.state.objects:
                if self.state.objects[under].slice_index == lead:
                    return under
                hit = self.elsewhere(under, lead) if self.elsewhere is not None else None
                if hit is not None:
                    return hit
        inside = [
            (max(o.box[2] - o.box[0], o.box[3] - o.box[1]), oid)
            for oid, o in self.state.objects.items()
            if o.box is not None and o.slice_index == lead and o.box[0] <= x <= o.box[2] and o.box[1] <= y <= o.box[3]
        ]
        if inside:
            return min(inside)[1]
        if self.selected in self.state.objects and self.state.objects[self.selected].slice_index == lead:
            return self.selected
        return None

    def reconcile(self) -> None:
        """Give new points an object, then compare every object's clicks with the layer's points."""
        if self._reconciling or self.points_layer is None:
            return
        self._reconciling = True
        try:
            layer = self.points_layer
            feats = layer.features
            ids = np.array(feats[OBJECT_ID].fillna(0), np.int64) if len(feats) else np.zeros(0, np.int64)
            labels = np.array(feats[LABEL].fillna(1), np.int64) if len(feats) else np.zeros(0, np.int64)
            drop = []
            for i, point in enumerate(np.asarray(layer.data, float)):
                if ids[i] > 0 and ids[i] in self.state.objects:
                    continue
                lead = self.layers._clip_lead(tuple(int(round(v)) for v in point[:-2]))
                owner = self._owner(lead, point[-1], point[-2])
                if owner is None and labels[i] == 1:
                    owner = self.state.add_object(None, lead, labels_max=self.layers.labels_max()).id
                if owner is None:
                    drop.append(i)  # a negative click on no object says nothing
                    continue
                ids[i] = owner
                self.selected = owner
            if drop:
                keep = np.setdiff1d(np.arange(len(ids)), drop)
                layer.data, ids, labels = np.asarray(layer.data)[keep], ids[keep], labels[keep]
            if len(ids):
                self._set_features(ids, labels)
            self._sync(np.asarray(layer.data, float), ids, labels)
        finally:
            self._reconciling = False

    def _set_features(self, ids: np.ndarray, labels: np.ndarray) -> None:
        """Every point's object and label (and colour)."""
        layer = self.points_layer
        layer.features = {OBJECT_ID: ids, LABEL: labels}
        if len(ids):
            layer.face_color = [POSITIVE_COLOR if v else NEGATIVE_COLOR for v in labels]

    def _sync(self, data: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> None:
        """Set each object's clicks from the layer; emit what changed."""
        clicks: dict[int, list[Click]] = {}
        for point, oid, label in zip(data, ids, labels):
            clicks.setdefault(int(oid), []).append((float(point[-1]), float(point[-2]), int(label)))
        changed, removed = [], []
        for oid, obj in list(self.state.objects.items()):
            now = clicks.get(oid, [])
            if now == obj.clicks:
                continue
            if not now and obj.box is None:  # a clicks-only object lost its last click
                self.state.remove_object(oid)
                self.layers.write(oid, None, None, slice_index=obj.slice_index)
                removed.append(oid)
                continue
            self.state.set_clicks(oid, now)
            changed.append(oid)
        if removed:
            self.objects_removed.emit(removed)
        if changed:
            self.clicks_changed.emit(changed)

    # ------------------------------------------------------------------ other changes
    def drop_objects(self, object_ids: list[int]) -> None:
        """Delete the clicks of objects that are gone (their box was deleted)."""
        if self.points_layer is None or not len(self.points_layer.data):
            return
        ids = np.asarray(self.points_layer.features[OBJECT_ID], np.int64)
        keep = ~np.isin(ids, object_ids)
        if keep.all():
            return
        self._reconciling = True
        try:
            labels = np.asarray(self.points_layer.features[LABEL], np.int64)[keep]
            self.points_layer.data = np.asarray(self.points_layer.data)[keep]
            self._set_features(ids[keep], labels)
        finally:
            self._reconciling = False

    def restore(self) -> None:
        """Show the clicks of the objects in the state (after a project is reopened)."""
        rows, ids, labels = [], [], []
        for oid, obj in sorted(self.state.objects.items()):
            for x, y, label in obj.clicks:
                rows.append(list(obj.slice_index) + [y, x])
                ids.append(oid)
                labels.append(label)
        if self.points_layer is None or not rows:
            return
        self._reconciling = True
        try:
            self.points_layer.data = np.asarray(rows, float)
            self._set_features(np.asarray(ids, np.int64), np.asarray(labels, np.int64))
        finally:
            self._reconciling = False
