""""Propagate": the boxed objects of a stack or time series segmented through it (hrmedseg.engine.propagation).

Each boxed object is prompted on its own slice. A box drawn on another slice over an object
propagated before (its box overlaps that object's mask box on that slice) is a correction of
that object: the next "Propagate" takes both prompts, each slice following the nearer one. The
work runs in the job queue's worker; progress comes back slice by slice, Cancel stops between
slices (nothing is written then), and the result goes into the masks layer in ONE
``data_setitem``: one step of napari's undo history.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .._layer_image import spatial_shape
from .jobs import prepare_worker_thread

if TYPE_CHECKING:
    from .annotator import Annotator

#: a box whose IoU with a propagated object's mask box on its slice reaches this corrects that object
CORRECTION_IOU = 0.3


def _iou(a: Any, b: Any) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _mask_boxes(labels: np.ndarray, object_id: int) -> dict[int, tuple[float, float, float, float]]:
    """{slice: xyxy box of ``object_id`` there} of a (Z, H, W) label volume."""
    out = {}
    for z in np.nonzero((labels == object_id).any(axis=(1, 2)))[0]:
        ys, xs = np.nonzero(labels[z] == object_id)
        out[int(z)] = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return out


class Propagation:
    """The annotator's propagated objects: which boxes prompt which object, and the jobs."""

    def __init__(self, annotator: "Annotator") -> None:
        self.annotator = annotator
        self.owner: dict[int, int] = {}  # box object id -> the propagated object it prompts
        self.mask_boxes: dict[int, dict[int, tuple]] = {}  # propagated object -> {slice: its mask box}

    def prompts(self, object_ids: Iterable[int] | None) -> list:
        """SlicePrompts of the boxed objects (all, or ``object_ids`` and the boxes that correct them)."""
        from hrmedseg.engine.propagation import SlicePrompt

        state = self.annotator.state
        for oid, obj in sorted(state.objects.items()):  # new boxes over a propagated object correct it
            if oid not in self.owner and obj.box is not None and obj.slice_index:
                z = obj.slice_index[0]
                hit = next((root for root, boxes in self.mask_boxes.items() if root != oid and z in boxes
                            and _iou(obj.box, boxes[z]) >= CORRECTION_IOU), None)
                self.owner[oid] = hit if hit is not None else oid
        wanted = None if object_ids is None else {self.owner.get(i, i) for i in object_ids}
        out = []
        for oid, obj in sorted(state.objects.items()):
            root = self.owner.get(oid, oid)
            if obj.box is None or not obj.slice_index or (wanted is not None and root not in wanted):
                continue
            xy = np.array([c[:2] for c in obj.clicks], np.float64).reshape(-1, 2)
            out.append(SlicePrompt(obj.slice_index[0], root, box=obj.box, points=xy,
                                   point_labels=np.array([c[2] for c in obj.clicks], np.int64)))
        # one prompt per object and slice: the newest box there wins
        return list({(p.object_id, p.slice_index): p for p in out}.values())

    def start(self, object_ids: Iterable[int] | None = None) -> Any:
        """Queue the propagation of every boxed object (or of ``object_ids``); returns the job or None."""
        ann = self.annotator
        if ann.predictor is None or ann.image_layer is None:
            ann.status.emit("choose a model and an image first")
            return None
        if len(spatial_shape(ann.image_layer)) != 3:
            ann.status.emit("Propagate needs a stack or a time series (one axis before Y, X)")
            return None
        prompts = self.prompts(object_ids)
        if not prompts:
            ann.status.emit("draw a box on a slice first" if object_ids is None else "select boxes to propagate first")
            return None
        ann.cancel()
        predictor, data = ann.predictor, ann.image_layer.data
        data = data[0] if getattr(ann.image_layer, "multiscale", False) else data
        cancel = threading.Event()

        def run(progress):
            from hrmedseg.engine.propagation import propagate
            from hrmedseg.io.stacks import open_stack

            prepare_worker_thread()
            axes = "ZYXC" if getattr(ann.image_layer, "rgb", False) else "ZYX"
            return propagate(predictor, open_stack(data, axes=axes), prompts, progress=progress, cancel=cancel.is_set)

        def work():
            # progress crosses back to the UI thread as yielded items (the queue's workers emit through Qt)
            events: queue.Queue = queue.Queue()
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(run, lambda done, total: events.put((done, total)))
                while not future.done() or not events.empty():
                    try:
                        yield "progress", events.get(timeout=0.05)
                    except queue.Empty:
                        pass
                yield "result", future.result()

        def on_yield(item):
            kind, value = item
            if kind == "progress":
                ann.progress.emit(*value)
            elif not value.cancelled and not cancel.is_set():
                self.apply(value)

        n = len({p.object_id for p in prompts})
        return ann.jobs.submit(work, None, f"propagating {n} object(s)", on_yield=on_yield, cancel=cancel)

    def apply(self, result: Any) -> int:
        """Write a PropagationResult into the masks layer as one undo step; returns voxels changed."""
        ann = self.annotator
        layer = ann.labels_layer
        roots = set(result.scores) | {r for r in self.owner.values() if r in result.scores}
        members = {oid for oid, root in self.owner.items() if root in roots}
        old = np.asarray(layer.data)
        new = old.copy()
        new[np.isin(new, list(roots | members))] = 0  # the objects' earlier masks, on every slice
        hit = result.labels > 0
        new[hit] = result.labels[hit]
        zs, ys, xs = np.nonzero(new != old)
        if zs.size:
            with layer.block_history():
                layer.data_setitem((zs, ys, xs), new[zs, ys, xs].astype(layer.data.dtype))
            ann.state.dirty = True
        for root in roots:
            self.mask_boxes[root] = _mask_boxes(result.labels, root)
        spans = ", ".join(f"{oid}: slices {lo}..{hi}" for oid, (lo, hi) in sorted(result.extents.items())[:6])
        ann.status.emit(f"propagated {len(result.extents)} object(s) ({spans})")
        return int(zs.size)
