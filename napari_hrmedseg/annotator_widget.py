"""The annotator dock: thin Qt controls over ``Annotator`` (no torch import here).

Open docks are registered per viewer, so other docks (the Train dock) find this one through
``annotator_widget_for(viewer)`` instead of napari's private dock list.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from hrmedseg.errors import HRMedSegError

from ._model import DEVICES, UNTRAINED_BANNER, UNTRAINED_CHOICE, MissingWeights, download_weights, registry_choices
from ._interchange_widgets import ClassRow, ExportRow
from .annotator import Annotator

#: key -> (what it does, Annotator method name); documented in tooltips and the README
SHORTCUTS = {
    "Shift-S": ("Commit: save labels, boxes and provenance to the project folder", "commit"),
    "Shift-C": ("Clear: remove every box and its mask (Ctrl+Z on the masks layer restores masks)", "clear"),
    "N": ("Next object: new label id for painting, rectangle mode for the next box", "next_object"),
}

CHOOSE_FILE = "Choose file..."


#: the annotator docks open now, oldest first (weak: a dock napari has deleted drops out)
_OPEN_DOCKS: list[weakref.ref[AnnotatorWidget]] = []


START_TEXT = "Choose an image and a model, then draw boxes."
NO_BOXES_TEXT = "No boxes yet:"


def no_boxes_hint(layer: Any) -> str:
    """The dock's hint for an image without boxes; the fundus sample is told where to draw."""
    source = Path(str(getattr(layer, "metadata", {}).get("hrmedseg_source", ""))).name
    target = "the optic disc (the bright round spot)" if "fundus" in source or "fundus" in layer.name else "an object"
    return (
        f"{NO_BOXES_TEXT} press N (or Draw boxes) and drag a box around {target}, "
        "or open a box file with hrmedseg-annotate --boxes FILE."
    )


def _shortcut_help(key: str) -> str:
    return f"{SHORTCUTS[key][0]}  [{key.replace('-', '+')}]"


def _alive(widget: QWidget) -> bool:
    """False once Qt has deleted the widget underneath its Python object."""
    try:
        widget.objectName()
    except RuntimeError:  # "wrapped C/C++ object ... has been deleted"
        return False
    return True


def annotator_widget_for(viewer: Any) -> AnnotatorWidget | None:
    """The annotator dock open in ``viewer`` (the most recently opened one), or None.

    The public hook for other docks: e.g. the Train dock hands its trained weights to
    ``annotator_widget_for(viewer).set_model(path)``, which selects them in the model box too.
    """
    _OPEN_DOCKS[:] = [ref for ref in _OPEN_DOCKS if ref() is not None and _alive(ref())]
    for ref in reversed(_OPEN_DOCKS):
        widget = ref()
        if widget is not None and widget.viewer is viewer:
            return widget
    return None


def _register(widget: AnnotatorWidget) -> None:
    _OPEN_DOCKS.append(weakref.ref(widget))


def _unregister(widget: AnnotatorWidget) -> None:
    _OPEN_DOCKS[:] = [ref for ref in _OPEN_DOCKS if ref() is not None and ref() is not widget]


class AnnotatorWidget(QWidget):
    """Dock for box-prompted annotation: image, model and device choice; boxes -> masks; commit."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.annotator = Annotator(napari_viewer)
        self._file_choice: str | None = None

        layout = QVBoxLayout(self)
        form = QFormLayout()
        layout.addLayout(form)

        self.image_combo = QComboBox()
        self.image_combo.setToolTip(
            "Image layer to annotate: 2D grey, RGB, or nD (the slice on screen is used). "
            "Boxes go into '<image> boxes', masks into '<image> masks'."
        )
        form.addRow("Image", self.image_combo)

        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Weights: a registry name, a file of your own, or untrained random weights (testing)")
        form.addRow("Model", self.model_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setToolTip("auto: CUDA if present, else Apple MPS, else CPU")
        form.addRow("Device", self.device_combo)
        self.load_button = QPushButton("Load model")
        self.load_button.setToolTip("Load the chosen weights (in the background); boxes drawn before are segmented then")
        form.addRow("", self.load_button)

        self.banner = QLabel(UNTRAINED_BANNER.upper())
        self.banner.setStyleSheet("background:#b00020;color:white;font-weight:bold;padding:4px;")
        self.banner.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.banner.setToolTip("These weights were never trained: the masks show the pipeline works, nothing more.")
        self.banner.setVisible(False)
        layout.addWidget(self.banner)

        self.missing_box = QGroupBox("Weights missing")
        missing_layout = QVBoxLayout(self.missing_box)
        self.missing_label = QLabel()
        self.missing_label.setWordWrap(True)
        self.missing_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        missing_layout.addWidget(self.missing_label)
        row = QHBoxLayout()
        self.download_button = QPushButton("Download")
        self.download_button.setToolTip("Download the file into hrmedseg's cache (needs the internet), then load it")
        self.choose_button = QPushButton("Choose file...")
        self.choose_button.setToolTip("Use a weights file you already have")
        row.addWidget(self.download_button)
        row.addWidget(self.choose_button)
        missing_layout.addLayout(row)
        self.missing_box.setVisible(False)
        layout.addWidget(self.missing_box)

        buttons = QHBoxLayout()
        self.draw_button = QPushButton("Draw boxes")
        self.draw_button.setToolTip(
            "Rectangle mode on the boxes layer. Draw a box: its mask becomes a new object; move or resize "
            "it: the object is recomputed; delete it: the object goes. " + _shortcut_help("N")
        )
        self.segment_all_button = QPushButton("Segment all")
        self.segment_all_button.setToolTip("Recompute every box (batched), with progress; Cancel stops it")
        self.every_object_button = QPushButton("Find all")
        self.every_object_button.setToolTip("Segment every object without boxes (prompt-free proposals, then the box model); one undo step")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.clear_button = QPushButton("Clear")
        self.clear_button.setToolTip(_shortcut_help("Shift-C"))
        for b in (self.draw_button, self.segment_all_button, self.every_object_button, self.cancel_button, self.clear_button):
            buttons.addWidget(b)
        layout.addLayout(buttons)
        self.class_row = ClassRow(self.annotator)
        layout.addWidget(self.class_row)

        clicks_row = QHBoxLayout()
        self.clicks_button = QPushButton("Add clicks")
        self.clicks_button.setToolTip(
            "Add mode on the clicks layer: a click refines the object under it (else the last one drawn; "
            "on empty space after 'Draw boxes' it starts an object of clicks alone). Alt+click: negative. "
            "Delete a click (select mode) to recompute."
        )
        self.negative_check = QCheckBox("Negative clicks")
        self.negative_check.setToolTip("Every click says 'not this object' (as Alt+click does)")
        clicks_row.addWidget(self.clicks_button)
        clicks_row.addWidget(self.negative_check)
        layout.addLayout(clicks_row)

        stack_row = QHBoxLayout()  # stacks and time series
        self.propagate_button = QPushButton("Propagate")
        self.propagate_button.setToolTip("Stacks / time series: segment every boxed object through the slices from its box "
                                         "(a box over a propagated object on another slice corrects it); one undo step; Cancel stops it")
        self.propagate_selected_button = QPushButton("Propagate selected")
        self.propagate_selected_button.setToolTip("As Propagate, for the boxes selected in the boxes layer")
        stack_row.addWidget(self.propagate_button)
        stack_row.addWidget(self.propagate_selected_button)
        layout.addLayout(stack_row)

        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setVisible(False)
        layout.addWidget(self.progress)

        store_box = QGroupBox("Annotation store (project folder)")
        store_layout = QVBoxLayout(store_box)
        row = QHBoxLayout()
        self.project_edit = QLineEdit()
        self.project_edit.setPlaceholderText("folder for project.json, labels/, annotations/")
        self.browse_button = QPushButton("Browse...")
        row.addWidget(self.project_edit)
        row.addWidget(self.browse_button)
        store_layout.addLayout(row)
        row = QHBoxLayout()
        self.commit_button = QPushButton("Commit")
        self.commit_button.setToolTip(
            _shortcut_help("Shift-S") + ". Paint or erase in the masks layer first to correct; "
            "Ctrl+Z / Ctrl+Shift+Z on the masks layer undo and redo."
        )
        self.open_button = QPushButton("Open project")
        self.open_button.setToolTip("Restore this image's masks and boxes from the project folder")
        row.addWidget(self.commit_button)
        row.addWidget(self.open_button)
        store_layout.addLayout(row)
        self.export_row = ExportRow(self.annotator)
        store_layout.addWidget(self.export_row)
        layout.addWidget(store_box)

        self.status_label = QLabel(START_TEXT)
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)
        self.setToolTip("Shortcuts: " + "; ".join(_shortcut_help(k) for k in SHORTCUTS))

        # wiring
        self.image_combo.currentIndexChanged.connect(self._on_image_chosen)
        self.load_button.clicked.connect(self.load_model)
        self.model_combo.currentTextChanged.connect(self._on_model_text)
        self.download_button.clicked.connect(self._download)
        self.choose_button.clicked.connect(self._choose_file)
        self.draw_button.clicked.connect(self.annotator.next_object)
        self.clicks_button.clicked.connect(self.annotator.start_clicks)
        self.negative_check.toggled.connect(lambda on: setattr(self.annotator, "negative_clicks", on))
        self.segment_all_button.clicked.connect(self.annotator.segment_all)
        self.every_object_button.clicked.connect(lambda: self.annotator.segment_every_object())
        self.cancel_button.clicked.connect(self.annotator.cancel)
        self.propagate_button.clicked.connect(lambda: self.annotator.propagate())
        self.propagate_selected_button.clicked.connect(lambda: self.annotator.propagate(selected=True))
        self.clear_button.clicked.connect(self.annotator.clear)
        self.commit_button.clicked.connect(self.commit)
        self.open_button.clicked.connect(self.open_project)
        self.browse_button.clicked.connect(self._browse_project)
        a = self.annotator
        a.jobs.busy.connect(self._on_busy)
        a.progress.connect(self._on_progress)
        a.status.connect(lambda text: self.status_label.setText(text))
        a.model_changed.connect(self._on_model_changed)
        a.weights_missing.connect(self._on_weights_missing)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_images)
        self._fill_models()
        self._refresh_images()
        self._bind_keys()
        _register(self)

    # ------------------------------------------------------------------ choices
    def _fill_models(self) -> None:
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems(registry_choices())
        self.model_combo.addItem(UNTRAINED_CHOICE)
        self.model_combo.addItem(CHOOSE_FILE)
        self.model_combo.blockSignals(False)

    def _image_layers(self) -> list[Any]:
        from napari.layers import Image

        return [lyr for lyr in self.viewer.layers if isinstance(lyr, Image)]

    def _refresh_images(self, event: Any = None) -> None:
        current = self.annotator.image_layer
        layers = self._image_layers()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for lyr in layers:
            self.image_combo.addItem(lyr.name)
        if current in layers:
            self.image_combo.setCurrentIndex(layers.index(current))
        self.image_combo.blockSignals(False)
        if current not in layers:
            self._on_image_chosen()

    def _on_image_chosen(self, index: int | None = None) -> None:
        layers = self._image_layers()
        i = self.image_combo.currentIndex()
        self.annotator.set_image_layer(layers[i] if 0 <= i < len(layers) else None)
        self.show_box_hint()

    def show_box_hint(self) -> None:
        """One line on how to start when the image has no boxes (a new user sees an empty canvas)."""
        layer, boxes = self.annotator.image_layer, self.annotator.boxes_layer
        if layer is not None and boxes is not None and len(boxes.data) == 0:
            self.status_label.setText(no_boxes_hint(layer))
        elif self.status_label.text().startswith(NO_BOXES_TEXT):
            self.status_label.setText(START_TEXT)

    def set_image_layer(self, layer: Any) -> None:
        self.image_combo.setCurrentIndex(self._image_layers().index(layer))

    def _on_model_text(self, text: str) -> None:
        if text == CHOOSE_FILE:
            self._choose_file()

    def set_model(self, choice: str) -> Any:
        """Choose and load a model: a registry name, UNTRAINED_CHOICE or a file path."""
        if choice not in (self.model_combo.itemText(i) for i in range(self.model_combo.count())):
            self.model_combo.insertItem(self.model_combo.count() - 1, choice)
        self.model_combo.blockSignals(True)
        self.model_combo.setCurrentText(choice)
        self.model_combo.blockSignals(False)
        return self.load_model()

    def load_model(self) -> Any:
        choice = self.model_combo.currentText()
        if choice == CHOOSE_FILE:
            return self._choose_file()
        self.missing_box.setVisible(False)
        return self.annotator.set_model(choice, self.device_combo.currentText())

    def _choose_file(self) -> Any:
        path, _ = QFileDialog.getOpenFileName(self, "Weights file", "", "Weights (*.pt *.pth *.bin);;All files (*)")
        if not path:
            return None
        return self.set_model(path)

    def _download(self) -> None:
        name = self.model_combo.currentText()
        self.missing_box.setVisible(False)

        def fetched(path):
            self.status_label.setText(f"downloaded {Path(path).name}")
            self.load_model()

        self.annotator.jobs.submit(lambda: download_weights(name), fetched, f"downloading {name}")

    def _on_weights_missing(self, missing: MissingWeights) -> None:
        self.missing_box.setTitle(f"Weights missing: {missing.file}")
        self.missing_label.setText(missing.message)
        self.download_button.setVisible(missing.can_download)
        self.missing_box.setVisible(True)

    def _on_model_changed(self, info: Any) -> None:
        self.banner.setVisible(bool(info is not None and info.untrained))

    # ------------------------------------------------------------------ progress
    def _on_busy(self, busy: bool, what: str) -> None:
        self.progress.setVisible(busy)
        self.cancel_button.setEnabled(busy)
        if busy:
            self.progress.setRange(0, 0)  # indeterminate until a batch reports progress
            self.progress.setFormat(what)
            self.status_label.setText(what + "...")
            self._progress_unit = "slices" if what.startswith("propagating") else "boxes"

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.progress.setFormat(f"%v / %m {getattr(self, '_progress_unit', 'boxes')}")

    # ------------------------------------------------------------------ store
    def _browse_project(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Project folder")
        if path:
            self.project_edit.setText(path)

    def _project(self) -> str | None:
        text = self.project_edit.text().strip()
        if not text:
            self._browse_project()
            text = self.project_edit.text().strip()
        return text or None

    def commit(self) -> Any:
        project = self._project()
        if project is None or self.annotator.labels_layer is None:
            self.status_label.setText("choose an image and a project folder to commit")
            return None
        return self.annotator.commit(project)

    def open_project(self) -> bool:
        project = self._project()
        if project is None:
            return False
        try:
            return self.annotator.open_project(project)
        except HRMedSegError as err:
            self.status_label.setText(str(err))
            return False

    # ------------------------------------------------------------------ keys
    def _bind_keys(self) -> None:
        actions = {"commit": self.commit, "clear": self.annotator.clear, "next_object": self.annotator.next_object}
        self._bound = []
        for key, (_, name) in SHORTCUTS.items():
            fn = actions[name]

            def callback(viewer, fn=fn):
                fn()

            try:
                self.viewer.bind_key(key, callback, overwrite=True)
                self._bound.append(key)
            except (TypeError, ValueError, AttributeError):  # key syntax of another napari version
                pass

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        _unregister(self)
        self.annotator.cancel()
        for key in getattr(self, "_bound", []):
            try:
                self.viewer.bind_key(key, None)
            except Exception:
                pass
        super().closeEvent(event)
