"""Saving and reopening one image's annotation in a project folder (``hrmedseg.store``).

``ProjectStore`` snapshots what a ``LayerBinding`` shows (labels, boxes, per-object provenance)
into an ``ImageAnnotation``, writes it in a job of the ``JobQueue``, and finds and checks the
saved annotation of an image layer when a project is reopened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from psygnal import Signal

from hrmedseg.errors import InputError
from hrmedseg.interchange import EXPORT_FORMATS
from hrmedseg.store import AnnotationStore, ImageAnnotation, image_key_for

from .._layer_image import spatial_shape
from .jobs import JobQueue
from .layers import LayerBinding


def image_source_of(layer: Any) -> str:
    """Where an image layer came from: its file, a sample's path, or (unsaved data) its name."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get("hrmedseg_source"):
        return str(meta["hrmedseg_source"])
    path = getattr(getattr(layer, "source", None), "path", None)
    if path:
        return str(path)
    return f"napari-layer:{layer.name}"


class ProjectStore:
    """The project folder of an annotation session: commit to it, reopen from it.

    Signal (psygnal, on the UI thread): ``status(str)``, what was saved or found.
    """

    status = Signal(str)

    def __init__(self, layers: LayerBinding, jobs: JobQueue) -> None:
        self.layers = layers
        self.jobs = jobs
        self.project: Path | None = None

    def image_key(self) -> str:
        """The store's key for the bound image ("image" when none is bound)."""
        layer = self.layers.image_layer
        return image_key_for(image_source_of(layer)) if layer is not None else "image"

    def annotation(self) -> ImageAnnotation:
        """The current annotation as the store saves it (a snapshot of the labels)."""
        labels = np.array(self.layers.labels_layer.data, copy=True)
        image_layer = self.layers.image_layer
        return ImageAnnotation(
            image_key=self.image_key(),
            image_source=image_source_of(image_layer),
            labels=labels,
            objects=self.layers.state.records(labels),
            layer_name=image_layer.name,
        )

    def commit(self, project: str | Path | None = None, on_done: Callable[[], None] | None = None) -> Any:
        """Save labels, boxes and per-object provenance into the project folder (in a job)."""
        project = Path(project) if project is not None else self.project
        if project is None:
            raise ValueError("no project folder chosen")
        if self.layers.labels_layer is None:
            raise ValueError("no image layer chosen")
        self.project = project
        annotation = self.annotation()

        classes = list(self.layers.state.classes)

        def save() -> ImageAnnotation:
            store = AnnotationStore.create(project)
            for cls in classes:  # the store must know every class its objects name
                store.add_class(cls.name, cls.color)
            store.save(annotation)
            return annotation

        def saved(ann: ImageAnnotation) -> None:
            self.layers.state.mark_saved()
            self.status.emit(f"committed {len(ann.objects)} objects of '{ann.image_key}' to {project}")

        return self.jobs.submit(save, saved, f"saving to {project}", on_done=on_done)

    def export(self, path: str | Path, format: str, on_done: Callable[[], None] | None = None) -> Any:
        """Write what the layers show now (committed or not) as ``format`` (see ``EXPORT_FORMATS``), in a job."""
        if self.layers.labels_layer is None:
            raise ValueError("no image layer chosen")
        writer = EXPORT_FORMATS[format].write
        annotation, classes = self.annotation(), list(self.layers.state.classes)

        def write() -> Path:
            writer(Path(path), [annotation], classes)
            return Path(path)

        def written(out: Path) -> None:
            self.status.emit(f"exported {len(annotation.objects)} objects of '{annotation.image_key}' to {out}")

        return self.jobs.submit(write, written, f"exporting to {path}", on_done=on_done)

    def load(self, project: str | Path) -> ImageAnnotation | None:
        """The bound image's annotation in ``project``; None (and a status) if it has none.

        Raises InputError when the saved labels do not fit the image, and the store's errors
        when ``project`` is no annotation store.
        """
        store = AnnotationStore.open(project)
        self.project = Path(project)
        for cls in store.classes():
            self.layers.state.add_class(cls.name, cls.color)
        image_layer = self.layers.image_layer
        key = self.image_key()
        if key not in store.image_keys():
            source = store.find_source(image_source_of(image_layer))
            if source is None:
                self.status.emit(f"{project} has no annotation of '{key}' yet")
                return None
            key = source
        ann = store.load(key)
        shape = spatial_shape(image_layer)
        if tuple(ann.labels.shape) != shape:
            raise InputError(f"{project}: '{key}' has labels of shape {ann.labels.shape}, the image is {shape}")
        return ann
