"""The annotator: box prompts and clicks on an image layer become masks in its masks layer.

``Annotator`` joins four parts and a model: a ``LayerBinding`` (the layers and the annotation
state), a ``ClickBinding`` (the clicks layer: positive and negative clicks per object), a ``JobQueue`` (every model call in a worker thread, one at a time: the predictor is not
shared between threads) and a ``ProjectStore`` (commit and reopen). Qt-free apart from napari's
thread workers: the dock only builds controls and calls these methods; tests drive this class.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from psygnal import Signal

from hrmedseg.errors import HRMedSegError
from hrmedseg.store import ImageAnnotation

from .._layer_image import layer_plane
from .._model import UNTRAINED_BANNER, UNTRAINED_CHOICE, MissingWeights, check_weights, guard_torch_import, load_predictor
from .._state import AnnotatorState, ModelInfo
from .clicks import ClickBinding
from .jobs import JobQueue, prepare_worker_thread
from .layers import LayerBinding
from .store_io import ProjectStore


class Annotator:
    """Box-prompted annotation of one image layer at a time.

    Signals (psygnal, emitted on the UI thread): ``progress(int, int)``, ``status(str)``,
    ``model_changed(object)`` (a ModelInfo or None), ``weights_missing(object)`` (a
    MissingWeights), ``error(str)``. Whether work runs: ``jobs.busy(bool, str)``.
    """

    progress = Signal(int, int)
    status = Signal(str)
    model_changed = Signal(object)
    weights_missing = Signal(object)
    error = Signal(str)

    def __init__(self, viewer: Any) -> None:
        guard_torch_import()  # before any worker imports torch (see its docstring)
        self.viewer = viewer
        self.layers = LayerBinding(viewer)
        self.clicks = ClickBinding(self.layers)
        self.jobs = JobQueue()
        self.store = ProjectStore(self.layers, self.jobs)
        from .propagate import Propagation

        self.propagation = Propagation(self)
        # corrections of a propagated object (a click or paint on another slice) re-propagate it
        self.clicks.elsewhere = self.propagation.click_owner
        self.layers.painted.connect(self.propagation.on_paint)
        self.predictor: Any = None
        self._queue: "OrderedDict[int, int]" = OrderedDict()  # object id -> generation, to segment
        self.layers.objects_changed.connect(self._enqueue_all)
        self.layers.objects_changed.connect(lambda ids: self.clicks.select(ids[-1]))  # the last drawn
        self.layers.objects_removed.connect(self._dequeue_all)
        self.layers.objects_removed.connect(self.clicks.drop_objects)
        self.clicks.clicks_changed.connect(self._enqueue_all)
        self.clicks.objects_removed.connect(self._dequeue_all)
        self.jobs.idle.connect(self._pump)
        self.jobs.error.connect(self._on_error)
        self.store.status.connect(self.status.emit)

    # ------------------------------------------------------------------ what the parts hold
    @property
    def state(self) -> AnnotatorState:
        """The annotation state of the bound image."""
        return self.layers.state

    @property
    def image_layer(self) -> Any:
        return self.layers.image_layer

    @property
    def boxes_layer(self) -> Any:
        return self.layers.boxes_layer

    @property
    def labels_layer(self) -> Any:
        return self.layers.labels_layer

    @property
    def clicks_layer(self) -> Any:
        return self.clicks.points_layer

    @property
    def negative_clicks(self) -> bool:
        """Every click negative (the dock's toggle); otherwise only Alt+click is."""
        return self.clicks.negative

    @negative_clicks.setter
    def negative_clicks(self, value: bool) -> None:
        self.clicks.negative = bool(value)

    @property
    def overlap(self) -> str:
        """How a new mask meets other objects: "new_wins" (it overwrites them) or "keep_existing"."""
        return self.layers.overlap

    @overlap.setter
    def overlap(self, value: str) -> None:
        self.layers.overlap = value

    @property
    def project(self) -> Path | None:
        """The project folder last committed to or opened."""
        return self.store.project

    @property
    def is_busy(self) -> bool:
        return self.jobs.is_busy

    @property
    def pending(self) -> int:
        """Objects waiting to be (re)computed, plus the work running now."""
        return len(self._queue) + self.jobs.is_busy

    # ------------------------------------------------------------------ image
    def set_image_layer(self, layer: Any) -> None:
        """Annotate ``layer``: adds (or reuses) its '<name> boxes' and '<name> masks' layers."""
        if layer is self.image_layer:
            return
        self.cancel()
        self._queue.clear()
        self.layers.bind(layer)
        self.clicks.bind()

    def start_boxes(self) -> None:
        """Select the boxes layer in rectangle mode, ready to draw the next object."""
        self.layers.start_boxes()

    def start_clicks(self) -> None:
        """Select the clicks layer in add mode: a click refines the object under it (Alt: negative)."""
        self.clicks.start_clicks()

    # ------------------------------------------------------------------ model
    def set_model(self, choice: Any, device: str = "auto", on_done: Callable[[], None] | None = None) -> Any:
        """Load a model in a worker (registry name, file, UNTRAINED_CHOICE or a model object).

        A registry name whose file is missing emits ``weights_missing`` and loads nothing.
        """
        self.cancel()
        self.predictor = None
        self.state.model = None
        self.state.device = device
        self.model_changed.emit(None)

        def load():
            if isinstance(choice, str) and not Path(choice).expanduser().is_file() and "/" not in choice:
                if choice != UNTRAINED_CHOICE:
                    missing = check_weights(choice)
                    if missing is not None:
                        return missing
            return load_predictor(choice, device)

        def done(result):
            if isinstance(result, MissingWeights):
                self.weights_missing.emit(result)
                self.status.emit(f"weights missing: {result.file}")
                return
            self.predictor, info = result
            self.state.model = info
            self.model_changed.emit(info)
            self.layers.show_model()
            msg = f"model {info.name} ready on {getattr(self.predictor, 'device', device)}"
            self.status.emit(msg + (f" ({UNTRAINED_BANNER})" if info.untrained else ""))
            self._pump()

        return self.jobs.submit(load, done, f"loading model {choice}", on_done=on_done)

    def use_predictor(self, predictor: Any, info: ModelInfo) -> None:
        """Use an already built predictor (notebooks, tests); ``info`` is what the store records."""
        self.predictor = predictor
        self.state.model = info
        self.model_changed.emit(info)
        self.layers.show_model()
        self._pump()

    # ------------------------------------------------------------------ segmenting
    def _enqueue_all(self, object_ids: list[int]) -> None:
        for oid in object_ids:
            self._enqueue(oid)

    def _dequeue_all(self, object_ids: list[int]) -> None:
        for oid in object_ids:
            self._queue.pop(oid, None)

    def _enqueue(self, object_id: int) -> None:
        self._queue[object_id] = self.state.request(object_id)
        self._queue.move_to_end(object_id)
        self._pump()

    def _pump(self) -> None:
        """Start the next queued computation when nothing runs (none queued: the re-propagation
        of corrected propagated objects, if any)."""
        if self.jobs.is_busy:
            return
        if not self._queue:
            self.propagation.run_pending()
            return
        if self.predictor is None:
            self.status.emit("choose a model to segment the boxes")
            return
        object_id, generation = self._queue.popitem(last=False)
        obj = self.state.objects.get(object_id)
        if obj is None or (obj.box is None and not obj.clicks):
            self._pump()
            return
        image = layer_plane(self.image_layer, obj.slice_index)
        predictor = self.predictor
        if obj.clicks or hasattr(predictor, "predict_boxes"):
            if obj.clicks:
                prompt = click_prompt(obj, self.state.median_box_side())
            else:  # a box alone plans its own crop (the box may have moved off the last one)
                prompt = dict(boxes=np.asarray(obj.box, np.float64).reshape(1, 4))
            prompt |= box_policy(predictor)
            predict = lambda: next(iter(predictor.predict_boxes(image, **prompt)))  # noqa: E731
        else:
            box = obj.box
            predict = lambda: predictor.predict_box(image, box)  # noqa: E731

        def work():
            prepare_worker_thread()
            return predict()

        def done(result):
            if self._apply(object_id, generation, result):
                self.propagation.segmented(object_id)  # a correction of a propagated object?

        self.jobs.submit(work, done, f"segmenting object {object_id}")

    def _apply(self, object_id: int, generation: int, result: Any) -> bool:
        """Write an object's result if it is still current; returns whether it was."""
        if not self.state.is_current(object_id, generation):
            return False  # the box moved or was deleted while this ran; a newer request follows
        obj = self.state.objects[object_id]
        # what a next click refines: these logits as SAM's mask prompt, on this (cached) crop
        obj.low_res_logits, obj.crop = getattr(result, "low_res_logits", None), getattr(result, "crop", None)
        if getattr(result, "empty", False) or result.mask is None or not np.any(result.mask):
            self.layers.write(object_id, None, None, slice_index=obj.slice_index)
            self.state.record_prediction(object_id, result.region, np.zeros((0, 0), bool), result.score)
            self.status.emit(f"object {object_id}: the model found nothing in its box")
            return True
        self.layers.write(object_id, result.region, result.mask, slice_index=obj.slice_index)
        self.state.record_prediction(object_id, result.region, result.mask, getattr(result, "score", None))
        if self.state.model and self.state.model.untrained:
            self.status.emit(f"object {object_id} segmented ({UNTRAINED_BANNER})")
        else:
            self.status.emit(f"object {object_id} segmented (score {getattr(result, 'score', float('nan')):.2f})")
        return True

    def segment_all(self, only_missing: bool = False) -> Any:
        """(Re)compute every box, batched per plane through ``predict_boxes``; progress + cancel."""
        if self.predictor is None:
            self.status.emit("choose a model first")
            return None
        self.cancel()
        self._queue.clear()
        jobs: dict[tuple[int, ...], list[tuple[int, int, tuple]]] = {}
        for oid, obj in sorted(self.state.objects.items()):
            if (obj.box is None and not obj.clicks) or (only_missing and obj.predicted_mask is not None):
                continue
            jobs.setdefault(obj.slice_index, []).append((oid, self.state.request(oid), obj))
        total = sum(len(v) for v in jobs.values())
        if total == 0:
            self.status.emit("no boxes to segment")
            return None
        cancel = threading.Event()
        predictor, image_layer = self.predictor, self.image_layer
        object_size = self.state.median_box_side()

        def work():
            prepare_worker_thread()
            done = 0
            for lead, items in jobs.items():
                image = layer_plane(image_layer, lead)
                objs = [obj for _, _, obj in items]
                if hasattr(predictor, "predict_boxes"):
                    prompts = clicks_prompts(objs, object_size) | box_policy(predictor)
                    results = predictor.predict_boxes(image, cancel=cancel, **prompts)
                else:
                    results = (predictor.predict_box(image, o.box) for o in objs)
                for (oid, gen, _), result in zip(items, results):
                    done += 1
                    yield oid, gen, result, done, total
                    if cancel.is_set():
                        return

        def on_yield(item):
            oid, gen, result, done, total_ = item
            self._apply(oid, gen, result)
            self.progress.emit(done, total_)

        self.progress.emit(0, total)
        return self.jobs.submit(work, None, f"segmenting {total} boxes", on_yield=on_yield, cancel=cancel)

    def segment_every_object(self, proposer: Any = "nuclei") -> Any:
        """Find and segment every object of the current plane without boxes (see ``every_object``)."""
        from .every_object import segment_every_object

        return segment_every_object(self, proposer)

    def propagate(self, selected: bool = False) -> Any:
        """Segment the boxed objects of a stack through it (``selected``: only the selected boxes'); see ``propagate``."""
        return self.propagation.start(self.layers.selected_ids() if selected else None)

    def cancel(self) -> None:
        """Stop "Segment all" (results already written stay; Ctrl+Z removes them one by one)."""
        self.jobs.cancel()

    def _on_error(self, err: BaseException) -> None:
        msg = str(err) if isinstance(err, HRMedSegError) else f"{type(err).__name__}: {err}"
        self.error.emit(msg)
        self.status.emit(msg)

    # ------------------------------------------------------------------ commands
    def next_object(self) -> int:
        """Ready a new object: a fresh label id for painting and rectangle mode for the next box;
        a click off every object now starts a new one."""
        # the id the next box will get, so painting now and drawing next agree
        new_id = self.state.peek_object_id(self.layers.labels_max())
        if self.labels_layer is not None:
            self.labels_layer.selected_label = new_id
        self.clicks.select(None)
        self.start_boxes()
        return new_id

    def clear(self) -> None:
        """Remove every box and its mask (mask removals can be undone in the Labels layer)."""
        self.cancel()
        self._queue.clear()
        self.layers.remove_all_boxes()

    # ------------------------------------------------------------------ store
    def image_key(self) -> str:
        return self.store.image_key()

    def annotation(self) -> ImageAnnotation:
        """The current annotation as the store saves it (a snapshot of the labels)."""
        return self.store.annotation()

    def commit(self, project: str | Path | None = None, on_done: Callable[[], None] | None = None) -> Any:
        """Save labels, boxes and per-object provenance into the project folder (in a worker)."""
        return self.store.commit(project, on_done)

    # ------------------------------------------------------------------ classes and export
    def add_class(self, name: str, color: Any = None) -> Any:
        """Add an object class to the session (kept when the image changes) and return it."""
        return self.state.add_class(name, color)

    def choose_class(self, class_name: str | None) -> list[int]:
        """New objects get ``class_name`` from now on; selected boxes' objects change to it. The ids changed."""
        self.state.set_class([], class_name)  # checks the name
        self.state.current_class = class_name
        changed = self.state.set_class(self.layers.selected_ids(), class_name)
        if changed:
            self.status.emit(f"{len(changed)} object(s) now {class_name or 'unclassified'}")
        return changed

    def export(self, path: str | Path, format: str) -> Any:
        """Export the current annotation (see ``ProjectStore.export``)."""
        return self.store.export(path, format)

    def open_project(self, project: str | Path) -> bool:
        """Restore this image's labels and boxes from a project folder; False if it has none."""
        ann = self.store.load(project)
        if ann is None:
            return False
        self.cancel()
        self._queue.clear()
        self.layers.restore(ann)
        self.clicks.restore()
        self.status.emit(f"opened '{ann.image_key}' from {project}: {len(ann.objects)} objects")
        return True


def _click_arrays(obj: Any) -> tuple[np.ndarray, np.ndarray]:
    """An object's clicks as ((P, 2) xy, (P,) labels)."""
    xy = np.array([c[:2] for c in obj.clicks], np.float64).reshape(-1, 2)
    return xy, np.array([c[2] for c in obj.clicks], np.int64)


def box_policy(predictor: Any) -> dict[str, Any]:
    """``predict_boxes``' ``policy`` for boxes drawn one at a time: the engine's
    :func:`~hrmedseg.engine.crops.interactive_policy` of the predictor's own (none for a predictor without one)."""
    policy = getattr(predictor, "policy", None)
    if policy is None:
        return {}
    from hrmedseg.engine import interactive_policy

    return {"policy": interactive_policy(policy)}


def clicks_prompts(objs: list[Any], object_size: float | None) -> dict[str, Any]:
    """``BoxPredictor.predict_boxes`` keywords for objects' boxes (NaN: none) and clicks."""
    boxes = np.array([o.box if o.box is not None else [np.nan] * 4 for o in objs], np.float64).reshape(-1, 4)
    xy, labels = zip(*[_click_arrays(o) for o in objs]) if objs else ((), ())
    return dict(boxes=boxes, points=list(xy), point_labels=list(labels), object_size=object_size)


def click_prompt(obj: Any, object_size: float | None) -> dict[str, Any]:
    """``predict_boxes`` keywords for one object: its box and clicks, and, when a click was just
    added and every click lies in the crop of its last result, that crop and its logits as mask
    prompt (no new encoder call). Otherwise the engine plans a crop (cached when unchanged)."""
    prompt = clicks_prompts([obj], object_size)
    crop = obj.crop
    if crop is not None:
        xy = prompt["points"][0]
        inside = ((xy >= [crop.x0, crop.y0]) & (xy < [crop.x0 + crop.size, crop.y0 + crop.size])).all()
        if inside:
            prompt["crops"] = [crop]
            if obj.use_mask_prompt and obj.low_res_logits is not None:
                prompt["mask_inputs"] = [obj.low_res_logits]
    return prompt
