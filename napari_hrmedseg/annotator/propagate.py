""""Propagate": the boxed objects of a stack or time series segmented through it (hrmedseg.engine.propagation).

Each boxed object is prompted on its own slice. Once an object has been propagated, a
correction on any slice re-propagates it from there (``auto``; each slice follows the nearest
of the object's prompts, so only the corrected slice's share of the stack changes):

- a box drawn over the object on another slice (its box overlaps the object's mask box on that
  slice): a second prompt of the object on that slice;
- a click on the object's mask on another slice: a box prompt there (the mask's box on that
  slice, drawn into the boxes layer) carrying the click; later clicks there refine it;
- paint (or erase, fill) on the object's mask on a slice: the mask as painted is taken as it is
  on that slice and propagated from (erasing it all ends the object there).

A correction first gets its 2D mask like any box; the re-propagation runs when no other object
waits for one. The work runs in the job queue's worker; progress comes back slice by slice,
Cancel stops between slices (nothing is written then), and the result goes into the masks layer
in ONE ``data_setitem``: one step of napari's undo history.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterable, Sequence

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


def _atom_slices(atom: Any) -> Sequence[int]:
    """The slices a masked history atom's ``slice_key`` covers (its first index: a slice or one int)."""
    key = atom.slice_key[0]
    return range(*key.indices(10**9)) if isinstance(key, slice) else [int(key)]


def _painted_slices(atoms: list) -> dict[int, set[int]]:
    """{slice: labels whose pixels an edit of a (Z, H, W) masks layer touched there} from napari's
    history atoms: ``(indices, old values, new value)`` tuples, or masked atoms (``slice_key``,
    ``mask``, ``old_values``, ``new_value``) whose old values cover the changed pixels."""
    out: dict[int, set[int]] = {}
    for atom in atoms:
        if hasattr(atom, "slice_key"):
            zs = _atom_slices(atom)
            values = {int(v) for v in np.unique(np.asarray(atom.old_values))} | {int(np.asarray(atom.new_value).max())}
            for z in zs:
                out.setdefault(int(z), set()).update(values)
            continue
        indices, old, new = atom
        zs, old, new = np.asarray(indices[0]), np.asarray(old), np.broadcast_to(np.asarray(new), np.shape(indices[0]))
        for z in np.unique(zs):
            here = zs == z
            out.setdefault(int(z), set()).update(int(v) for v in np.unique(np.concatenate([old[here].ravel(), new[here].ravel()])))
    return out


def _edited_plane(plane: np.ndarray, atoms: list, z: int) -> np.ndarray:
    """A copy of slice ``z`` of a masks layer with an edit's atoms applied (napari emits ``paint``
    before it writes the pixels)."""
    out = np.array(plane, copy=True)
    for atom in atoms:
        if hasattr(atom, "slice_key"):
            zs = _atom_slices(atom)
            if z not in zs:
                continue
            region = out[atom.slice_key[1:]]
            if atom.mask is None:
                region[...] = atom.new_value
            else:
                mask = np.asarray(atom.mask)
                region[mask[z - zs[0]] if mask.ndim == 3 else mask] = atom.new_value
            continue
        indices, _, new = atom
        here = np.asarray(indices[0]) == z
        new = np.broadcast_to(np.asarray(new), np.shape(indices[0]))
        out[np.asarray(indices[1])[here], np.asarray(indices[2])[here]] = new[here]
    return out


class Propagation:
    """The annotator's propagated objects: which boxes prompt which object, and the jobs."""

    def __init__(self, annotator: "Annotator") -> None:
        self.annotator = annotator
        self.owner: dict[int, int] = {}  # box object id -> the propagated object it prompts
        self.mask_boxes: dict[int, dict[int, tuple]] = {}  # propagated object -> {slice: its mask box}
        self.painted: dict[int, dict[int, np.ndarray]] = {}  # propagated object -> {slice: (H, W) mask as painted}
        self.pending: set[int] = set()  # propagated objects corrected since, to re-propagate
        #: a correction of a propagated object re-propagates it (False: only "Propagate" does)
        self.auto = True
        #: at most this many slices from each prompt each way (None: no limit)
        self.max_slices: int | None = None

    def _assign_owners(self) -> None:
        """New boxes over a propagated object's mask box on their slice correct that object."""
        for oid, obj in sorted(self.annotator.state.objects.items()):
            if oid not in self.owner and obj.box is not None and obj.slice_index:
                z = obj.slice_index[0]
                hit = next((root for root, boxes in self.mask_boxes.items() if root != oid and z in boxes
                            and _iou(obj.box, boxes[z]) >= CORRECTION_IOU), None)
                self.owner[oid] = hit if hit is not None else oid

    def root(self, object_id: int) -> int:
        """The propagated object that ``object_id`` prompts (itself when it corrects none)."""
        return self.owner.get(object_id, object_id)

    # ------------------------------------------------------------------ corrections
    def segmented(self, object_id: int) -> None:
        """The annotator wrote ``object_id``'s new 2D mask (its box or clicks changed): when it
        prompts a propagated object, that object is re-propagated once nothing else waits."""
        self._assign_owners()
        root = self.root(object_id)
        obj = self.annotator.state.objects.get(object_id)
        if root not in self.mask_boxes or obj is None or not obj.slice_index:
            return
        self.painted.get(root, {}).pop(obj.slice_index[0], None)  # the newest correction of a slice wins
        if self.auto:
            self.pending.add(root)

    def click_owner(self, under: int, lead: tuple[int, ...]) -> int | None:
        """The object that takes a click on plane ``lead`` over object ``under``'s mask, where
        ``under`` is prompted on another plane: its correction on ``lead`` (an existing prompt of
        the same propagated object there, else a new box prompt: the mask's box on ``lead``)."""
        ann = self.annotator
        root = self.root(under)
        if root not in self.mask_boxes or len(lead) != 1:
            return None
        for oid, obj in ann.state.objects.items():
            if obj.slice_index == lead and self.root(oid) == root:
                return oid
        ys, xs = np.nonzero(np.asarray(ann.labels_layer.data[lead]) == under)
        oid = ann.layers.add_box((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), lead)
        self.owner[oid] = root
        return oid

    def on_paint(self, atoms: list) -> None:
        """A person edited the masks layer: each propagated object whose pixels changed on a slice
        takes its mask there, as it now is, as a prompt, and is re-propagated."""
        data = self.annotator.labels_layer.data
        for z, values in _painted_slices(atoms).items():
            for root in {self.root(int(v)) for v in values if v} & set(self.mask_boxes):
                members = [root] + [oid for oid, r in self.owner.items() if r == root and oid != root]
                self.painted.setdefault(root, {})[z] = np.isin(_edited_plane(np.asarray(data[z]), atoms, z), members)
                if self.auto:
                    self.pending.add(root)
        self.annotator._pump()

    def run_pending(self) -> Any:
        """Re-propagate the corrected objects (the annotator calls this when nothing else waits)."""
        if not self.pending or self.annotator.predictor is None:
            return None
        roots, self.pending = sorted(self.pending), set()
        return self.start(roots)

    # ------------------------------------------------------------------ propagation
    def prompts(self, object_ids: Iterable[int] | None) -> list:
        """SlicePrompts of the boxed objects (all, or ``object_ids`` and the boxes that correct
        them), and the masks painted over propagated objects."""
        from hrmedseg.engine.propagation import SlicePrompt

        state = self.annotator.state
        self._assign_owners()
        wanted = None if object_ids is None else {self.owner.get(i, i) for i in object_ids}
        out = []
        for oid, obj in sorted(state.objects.items()):
            root = self.owner.get(oid, oid)
            if obj.box is None or not obj.slice_index or (wanted is not None and root not in wanted):
                continue
            xy = np.array([c[:2] for c in obj.clicks], np.float64).reshape(-1, 2)
            out.append(SlicePrompt(obj.slice_index[0], root, box=obj.box, points=xy,
                                   point_labels=np.array([c[2] for c in obj.clicks], np.int64)))
        for root, masks in sorted(self.painted.items()):  # a painted slice is corrected after its box (segmented pops it)
            if wanted is None or root in wanted:
                out += [SlicePrompt(z, root, mask=m) for z, m in sorted(masks.items())]
        # one prompt per object and slice: the newest there wins
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
        max_slices = self.max_slices

        def run(progress):
            from hrmedseg.engine.propagation import propagate
            from hrmedseg.io.stacks import open_stack

            prepare_worker_thread()
            axes = "ZYXC" if getattr(ann.image_layer, "rgb", False) else "ZYX"
            return propagate(predictor, open_stack(data, axes=axes), prompts, max_slices=max_slices, progress=progress, cancel=cancel.is_set)

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
            with ann.layers.writing(), layer.block_history():
                layer.data_setitem((zs, ys, xs), new[zs, ys, xs].astype(layer.data.dtype))
            ann.state.dirty = True
        for root in roots:
            self.mask_boxes[root] = _mask_boxes(result.labels, root)
        spans = ", ".join(f"{oid}: slices {lo}..{hi}" for oid, (lo, hi) in sorted(result.extents.items())[:6])
        ann.status.emit(f"propagated {len(result.extents)} object(s) ({spans})")
        return int(zs.size)
