""""Segment every object": the engine's auto segmentation (hrmedseg.engine.auto) in the annotator.

The worker proposes objects on the current plane and segments each one (``auto_objects``); back on
the UI thread every object gets its box in the boxes layer (as if drawn, without a second computation)
and all masks go into the masks layer in ONE ``data_setitem``: one step of napari's undo history.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from .._layer_image import layer_plane
from .._state import object_edit, rectangle_from_box
from .jobs import prepare_worker_thread
from .layers import OBJECT_ID

if TYPE_CHECKING:
    from .annotator import Annotator


def current_lead(annotator: "Annotator") -> tuple[int, ...]:
    """Leading (non-spatial) indices of the plane the viewer shows, () for 2D images."""
    n_lead = annotator.labels_layer.data.ndim - 2
    return tuple(int(i) for i in annotator.viewer.dims.current_step[:n_lead])


def segment_every_object(annotator: "Annotator", proposer: Any = "nuclei") -> Any:
    """Queue the worker (returns the job, or None without a model or an image)."""
    if annotator.predictor is None or annotator.image_layer is None:
        annotator.status.emit("choose a model and an image first")
        return None
    annotator.cancel()
    predictor, image_layer, lead = annotator.predictor, annotator.image_layer, current_lead(annotator)
    cancel = threading.Event()

    def work():
        from hrmedseg.engine.auto import auto_objects

        prepare_worker_thread()
        return list(auto_objects(predictor, layer_plane(image_layer, lead), proposer, cancel=cancel))

    def done(results):
        if not cancel.is_set():
            apply_objects(annotator, results, lead)

    return annotator.jobs.submit(work, done, "segmenting every object", cancel=cancel)


def apply_objects(annotator: "Annotator", results: list, lead: tuple[int, ...]) -> list[int]:
    """Add one object per non-empty result: its box, its state, its mask (all masks: one undo step)."""
    binding, state = annotator.layers, annotator.state
    results = [r for r in results if not r.empty]
    if not results:
        annotator.status.emit("no objects found")
        return []
    plane = binding.labels_layer.data[lead] if lead else binding.labels_layer.data
    ids, edits = [], []
    binding._reconciling = True  # boxes added here are known objects: no recomputation
    try:
        for r in results:
            obj = state.add_object(tuple(float(v) for v in r.box), lead, labels_max=binding.labels_max())
            state.request(obj.id)
            state.record_prediction(obj.id, r.region, r.mask, r.score)
            (ys, xs), values, extent = object_edit(plane, obj.id, r.region, r.mask, overlap="keep_existing")
            if extent is not None:
                binding._extents[obj.id] = extent
            edits.append((ys, xs, values))
            ids.append(obj.id)
        layer = binding.boxes_layer
        layer.add_rectangles([rectangle_from_box(r.box, lead) for r in results])
        layer.features.loc[layer.features.index[-len(ids) :], OBJECT_ID] = ids
        layer.refresh_text()
    finally:
        binding._reconciling = False
    ys, xs, values = (np.concatenate(parts) for parts in zip(*edits))
    labels = binding.labels_layer
    index = tuple(np.full(ys.shape, i, dtype=np.intp) for i in lead) + (ys, xs)
    with labels.block_history():
        labels.data_setitem(index, values.astype(labels.data.dtype))
    state.dirty = True
    annotator.status.emit(f"{len(ids)} objects segmented")
    return ids
