"""The annotator: ties an image layer, a boxes (Shapes) layer and a masks (Labels) layer to the engine.

Qt-free apart from napari's thread workers: the dock (``_widget.py``) only builds controls and
calls these methods; tests drive this class directly. Every model call runs in a worker thread,
one at a time (the predictor is not shared between threads); results are written on the UI
thread with ``Labels.data_setitem``, so each mask is one step of napari's undo history.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from psygnal import Signal

from hrmedseg.store import AnnotationStore, ImageAnnotation, image_key_for

from ._layer_image import layer_plane, spatial_shape
from ._model import UNTRAINED_BANNER, MissingWeights, check_weights, load_predictor
from ._state import AnnotatorState, ModelInfo, boxes_from_rectangles, object_edit, rectangle_from_box

MIN_BOX_SIDE = 2.0  # pixels; smaller rectangles (a click without a drag) prompt nothing
OBJECT_ID = "object_id"


def lower_thread_priority(niceness: int = 10) -> None:
    """Give the calling (worker) thread less CPU than the UI thread when cores are scarce (Linux).

    On a loaded machine the model's thread and the canvas repaint compete for the same cores; a
    higher nice value for the worker lets napari repaint first. No effect where unsupported.
    """
    import os

    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except (AttributeError, OSError):  # not Linux, or not permitted
        pass


def image_source_of(layer: Any) -> str:
    """Where an image layer came from: its file, a sample's path, or (unsaved data) its name."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get("hrmedseg_source"):
        return str(meta["hrmedseg_source"])
    path = getattr(getattr(layer, "source", None), "path", None)
    if path:
        return str(path)
    return f"napari-layer:{layer.name}"


class Annotator:
    """Box-prompted annotation of one image layer at a time.

    Signals (psygnal, emitted on the UI thread): ``busy(bool, str)``, ``progress(int, int)``,
    ``status(str)``, ``model_changed(object)`` (a ModelInfo or None), ``weights_missing(object)``
    (a MissingWeights), ``error(str)``.
    """

    busy = Signal(bool, str)
    progress = Signal(int, int)
    status = Signal(str)
    model_changed = Signal(object)
    weights_missing = Signal(object)
    error = Signal(str)

    def __init__(self, viewer: Any) -> None:
        from ._model import guard_torch_import

        guard_torch_import()  # before any worker imports torch (see its docstring)
        self.viewer = viewer
        self.state = AnnotatorState()
        self.image_layer: Any = None
        self.boxes_layer: Any = None
        self.labels_layer: Any = None
        self.predictor: Any = None
        self.overlap = "new_wins"
        self.project: Path | None = None
        self._queue: "OrderedDict[int, int]" = OrderedDict()  # object id -> generation
        self._worker: Any = None
        self._batch_cancel: threading.Event | None = None
        self._reconciling = False
        self._extents: dict[int, tuple[int, int, int, int]] = {}
        self._deferred: list[Callable[[], Any]] = []  # work asked for while another worker ran

    # ------------------------------------------------------------------ layers
    def set_image_layer(self, layer: Any) -> None:
        """Annotate ``layer``: adds (or reuses) its '<name> boxes' and '<name> masks' layers."""
        if layer is self.image_layer:
            return
        self.cancel()
        self._queue.clear()
        self._disconnect()
        self.image_layer = layer
        model = self.state.model
        self.state = AnnotatorState()
        self.state.model = model
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
            self._reconcile()
        boxes.events.data.connect(self._on_boxes_data)
        labels.events.paint.connect(self._on_paint)
        self.start_boxes()
        self._update_labels_name()

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
                from ._model import UNTRAINED_CHOICE

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
            self._update_labels_name()
            msg = f"model {info.name} ready on {getattr(self.predictor, 'device', device)}"
            self.status.emit(msg + (f" ({UNTRAINED_BANNER})" if info.untrained else ""))
            self._pump()

        return self._run(load, done, f"loading model {choice}", on_done=on_done)

    def use_predictor(self, predictor: Any, info: ModelInfo) -> None:
        """Use an already built predictor (notebooks, tests); ``info`` is what the store records."""
        self.predictor = predictor
        self.state.model = info
        self.model_changed.emit(info)
        self._update_labels_name()
        self._pump()

    def _update_labels_name(self) -> None:
        if self.labels_layer is None or self.image_layer is None:
            return
        base = f"{self.image_layer.name} masks"
        untrained = self.state.model is not None and self.state.model.untrained
        self.labels_layer.name = base + (" [UNTRAINED WEIGHTS]" if untrained else "")

    # ------------------------------------------------------------------ boxes -> objects
    def _on_boxes_data(self, event: Any) -> None:
        if str(getattr(event, "action", "")) in ("added", "removed", "changed"):
            self._reconcile()

    def _on_paint(self, event: Any = None) -> None:
        self.state.dirty = True

    def _box_ids(self) -> np.ndarray:
        feats = self.boxes_layer.features
        if OBJECT_ID not in feats:
            feats[OBJECT_ID] = 0
        return np.asarray(feats[OBJECT_ID].fillna(0), dtype=np.int64)

    def _reconcile(self) -> None:
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
                    obj = self.state.add_object(box, lead, labels_max=self._labels_max())
                    layer.features.loc[layer.features.index[i], OBJECT_ID] = obj.id
                    assigned = True
                    to_compute.append(obj.id)
                elif obj.box is None or not np.allclose(obj.box, box) or obj.slice_index != lead:
                    old_lead = obj.slice_index
                    self.state.move_box(oid, box)
                    if old_lead != lead:  # moved to another slice: erase it on the old one
                        self._write(oid, None, None, slice_index=old_lead)
                        obj.slice_index = lead
                    to_compute.append(oid)
                seen.add(obj.id)
            gone = [oid for oid, obj in self.state.objects.items() if obj.box is not None and oid not in seen]
            for oid in gone:
                self._queue.pop(oid, None)
                obj = self.state.remove_object(oid)
                self._write(oid, None, None, slice_index=obj.slice_index if obj else ())
            if assigned:
                layer.refresh_text()
            for oid in to_compute:
                self._enqueue(oid)
        finally:
            self._reconciling = False

    def _clip_lead(self, lead: tuple[int, ...]) -> tuple[int, ...]:
        shape = spatial_shape(self.image_layer)
        return tuple(min(max(int(i), 0), n - 1) for i, n in zip(lead, shape[:-2]))

    def _labels_max(self) -> int:
        data = self.labels_layer.data
        if data.size <= 64_000_000:
            return int(np.max(data)) if data.size else 0
        return 0

    # ------------------------------------------------------------------ computing
    def _enqueue(self, object_id: int) -> None:
        self._queue[object_id] = self.state.request(object_id)
        self._queue.move_to_end(object_id)
        self._pump()

    def _pump(self) -> None:
        """Start the next queued computation when nothing runs."""
        if self._worker is not None or not self._queue:
            return
        if self.predictor is None:
            self.status.emit("choose a model to segment the boxes")
            return
        object_id, generation = self._queue.popitem(last=False)
        obj = self.state.objects.get(object_id)
        if obj is None or obj.box is None:
            self._pump()
            return
        image = layer_plane(self.image_layer, obj.slice_index)
        box, predictor = obj.box, self.predictor

        def predict():
            lower_thread_priority()
            return predictor.predict_box(image, box)

        def done(result):
            self._apply(object_id, generation, result)

        self._run(predict, done, f"segmenting object {object_id}")

    def _apply(self, object_id: int, generation: int, result: Any) -> None:
        if not self.state.is_current(object_id, generation):
            return  # the box moved or was deleted while this ran; a newer request follows
        obj = self.state.objects[object_id]
        if getattr(result, "empty", False) or result.mask is None or not np.any(result.mask):
            self._write(object_id, None, None, slice_index=obj.slice_index)
            self.state.record_prediction(object_id, result.region, np.zeros((0, 0), bool), result.score)
            self.status.emit(f"object {object_id}: the model found nothing in its box")
            return
        self._write(object_id, result.region, result.mask, slice_index=obj.slice_index)
        self.state.record_prediction(object_id, result.region, result.mask, getattr(result, "score", None))
        if self.state.model and self.state.model.untrained:
            self.status.emit(f"object {object_id} segmented ({UNTRAINED_BANNER})")
        else:
            self.status.emit(f"object {object_id} segmented (score {getattr(result, 'score', float('nan')):.2f})")

    def _write(self, object_id: int, region, mask, slice_index: tuple[int, ...] = ()) -> None:
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
        with layer.block_history():
            layer.data_setitem(lead + (ys, xs), values.astype(layer.data.dtype))
        self.state.dirty = True

    def segment_all(self, only_missing: bool = False) -> Any:
        """(Re)compute every box, batched per plane through ``predict_boxes``; progress + cancel."""
        from napari.qt.threading import create_worker

        if self.predictor is None:
            self.status.emit("choose a model first")
            return None
        self.cancel()
        self._queue.clear()
        jobs: dict[tuple[int, ...], list[tuple[int, int, tuple]]] = {}
        for oid, obj in sorted(self.state.objects.items()):
            if obj.box is None or (only_missing and obj.predicted_mask is not None):
                continue
            jobs.setdefault(obj.slice_index, []).append((oid, self.state.request(oid), obj.box))
        total = sum(len(v) for v in jobs.values())
        if total == 0:
            self.status.emit("no boxes to segment")
            return None
        cancel = threading.Event()
        self._batch_cancel = cancel
        predictor, image_layer = self.predictor, self.image_layer

        def work():
            lower_thread_priority()
            done = 0
            for lead, items in jobs.items():
                image = layer_plane(image_layer, lead)
                boxes = [box for _, _, box in items]
                if hasattr(predictor, "predict_boxes"):
                    results = predictor.predict_boxes(image, boxes, cancel=cancel)
                else:
                    results = (predictor.predict_box(image, b) for b in boxes)
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
        worker = create_worker(work, _start_thread=False)
        worker.yielded.connect(on_yield)
        return self._start(worker, None, f"segmenting {total} boxes", cancel=cancel)

    def cancel(self) -> None:
        """Stop "Segment all" (results already written stay; Ctrl+Z removes them one by one)."""
        if self._batch_cancel is not None:
            self._batch_cancel.set()
        if self._worker is not None and hasattr(self._worker, "quit"):
            self._worker.quit()

    @property
    def is_busy(self) -> bool:
        return self._worker is not None

    @property
    def pending(self) -> int:
        """Objects waiting to be (re)computed, plus the work running now."""
        return len(self._queue) + (self._worker is not None)

    def _run(self, fn: Callable[[], Any], on_result: Callable[[Any], None] | None, what: str,
             on_done: Callable[[], None] | None = None) -> Any:
        from napari.qt.threading import create_worker

        worker = create_worker(fn, _start_thread=False)
        return self._start(worker, on_result, what, on_done=on_done)

    def _start(self, worker: Any, on_result, what: str, cancel: threading.Event | None = None,
               on_done: Callable[[], None] | None = None) -> Any:
        if self._worker is not None:  # one worker at a time: start this one after the current
            self._deferred.append(lambda: self._start(worker, on_result, what, cancel, on_done))
            return worker
        self._worker = worker
        if on_result is not None:
            worker.returned.connect(on_result)
        worker.errored.connect(self._on_error)

        def finished():
            self._worker = None
            if cancel is not None and self._batch_cancel is cancel:
                self._batch_cancel = None
            if on_done is not None:
                on_done()
            if self._deferred:
                self._deferred.pop(0)()
            self._pump()
            if self._worker is None:
                self.busy.emit(False, "")

        worker.finished.connect(finished)
        self.busy.emit(True, what)
        worker.start()
        return worker

    def _on_error(self, err: BaseException) -> None:
        from hrmedseg.errors import HRMedSegError

        msg = str(err) if isinstance(err, HRMedSegError) else f"{type(err).__name__}: {err}"
        self.error.emit(msg)
        self.status.emit(msg)

    # ------------------------------------------------------------------ commands
    def next_object(self) -> int:
        """Ready a new object: a fresh label id for painting and rectangle mode for the next box."""
        # the id the next box will get, so painting now and drawing next agree
        new_id = self.state.peek_object_id(self._labels_max())
        if self.labels_layer is not None:
            self.labels_layer.selected_label = new_id
        self.start_boxes()
        return new_id

    def clear(self) -> None:
        """Remove every box and its mask (mask removals can be undone in the Labels layer)."""
        self.cancel()
        self._queue.clear()
        if self.boxes_layer is not None and len(self.boxes_layer.data):
            self.boxes_layer.selected_data = set(range(len(self.boxes_layer.data)))
            self.boxes_layer.remove_selected()

    # ------------------------------------------------------------------ store
    def image_key(self) -> str:
        return image_key_for(image_source_of(self.image_layer)) if self.image_layer is not None else "image"

    def annotation(self) -> ImageAnnotation:
        """The current annotation as the store saves it (a snapshot of the labels)."""
        labels = np.array(self.labels_layer.data, copy=True)
        return ImageAnnotation(
            image_key=self.image_key(),
            image_source=image_source_of(self.image_layer),
            labels=labels,
            objects=self.state.records(labels),
            layer_name=self.image_layer.name,
        )

    def commit(self, project: str | Path | None = None, on_done: Callable[[], None] | None = None) -> Any:
        """Save labels, boxes and per-object provenance into the project folder (in a worker)."""
        project = Path(project) if project is not None else self.project
        if project is None:
            raise ValueError("no project folder chosen")
        if self.labels_layer is None:
            raise ValueError("no image layer chosen")
        self.project = project
        annotation = self.annotation()

        def save():
            AnnotationStore.create(project).save(annotation)
            return annotation

        def saved(ann):
            self.state.mark_saved()
            self.status.emit(f"committed {len(ann.objects)} objects of '{ann.image_key}' to {project}")

        return self._run(save, saved, f"saving to {project}", on_done=on_done)

    def open_project(self, project: str | Path) -> bool:
        """Restore this image's labels and boxes from a project folder; False if it has none."""
        store = AnnotationStore.open(project)
        self.project = Path(project)
        key = self.image_key()
        if key not in store.image_keys():
            source = store.find_source(image_source_of(self.image_layer))
            if source is None:
                self.status.emit(f"{project} has no annotation of '{key}' yet")
                return False
            key = source
        ann = store.load(key)
        shape = spatial_shape(self.image_layer)
        if tuple(ann.labels.shape) != shape:
            from hrmedseg.errors import InputError

            raise InputError(f"{project}: '{key}' has labels of shape {ann.labels.shape}, the image is {shape}")
        self.cancel()
        self._queue.clear()
        self._reconciling = True
        try:
            self.boxes_layer.data = []
            model = self.state.model
            self.state = AnnotatorState()
            self.state.model = model
            self.labels_layer.data = ann.labels.astype(np.uint32, copy=False)
            rects, ids = [], []
            for record in ann.objects:
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
        self.status.emit(f"opened '{key}' from {project}: {len(ann.objects)} objects")
        return True
