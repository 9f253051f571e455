"""The Train dock: fine-tune a model on annotations in a separate process, with live progress.

Training runs as ``python -m hrmedseg.training.cli finetune ... --events`` in a ``QProcess``, so
napari stays responsive and a crash or a cancel cannot take the viewer down; the process prints
one ``@hrmedseg-event {json}`` line per event, which this widget turns into a progress bar, a
loss plot and the held-out Dice before and after. No torch import here.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from qtpy.QtCore import QPointF, QProcess, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from hrmedseg.model_kinds import model_kind

from .annotator_widget import annotator_widget_for

EVENT_PREFIX = "@hrmedseg-event "  # hrmedseg.training.cli.EVENT_PREFIX (not imported: keeps torch out)
SOURCE_STORE = "Annotation store folder"
SOURCE_PAIRS = "Folder of images/ + masks/"
SOURCE_VIEWER = "Image + labels layers in the viewer"
_BOX, _PROMPT_FREE = model_kind("hrmedseg_sam"), model_kind("hrmedseg")
#: the Model box's entries -> the training command line's --model value
MODELS = {
    f"Box-prompted ({_BOX.display}, annotator)": _BOX.option,
    f"Prompt-free ({_PROMPT_FREE.display})": _PROMPT_FREE.option,
}


class LossPlot(QWidget):
    """A small line plot of the training loss per step (and validation loss per epoch)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.train: list[tuple[float, float]] = []
        self.val: list[tuple[float, float]] = []
        self.setMinimumHeight(120)

    def clear(self) -> None:
        self.train, self.val = [], []
        self.update()

    def add(self, step: float, loss: float, validation: bool = False) -> None:
        if loss is not None and math.isfinite(loss):
            (self.val if validation else self.train).append((float(step), float(loss)))
            self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h, margin = self.width(), self.height(), 6
        painter.fillRect(0, 0, w, h, QColor(30, 30, 30))
        points = self.train + self.val
        if len(points) < 1:
            painter.setPen(QColor(160, 160, 160))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "loss appears here during training")
            return
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 or 1.0

        def to_screen(x: float, y: float) -> QPointF:
            return QPointF(margin + (x - x0) / (x1 - x0) * (w - 2 * margin),
                           h - margin - (y - y0) / (y1 - y0) * (h - 2 * margin - 14))

        for series, colour in ((self.train, QColor(80, 170, 255)), (self.val, QColor(255, 160, 60))):
            if series:
                painter.setPen(QPen(colour, 2))
                painter.drawPolyline(QPolygonF([to_screen(x, y) for x, y in series]))
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(margin, 12, f"loss {y1 / 1.05:.3f} max; train (blue), validation (orange)")


class TrainWidget(QWidget):
    """Dock: pick annotations, model and a few settings; train in a subprocess; use the result.

    Signals: ``weights_ready(str)`` when a run wrote its best weights; ``use_weights(str)`` when
    the user clicks "Use these weights" (the annotator dock can connect it). ``on_use_weights``
    may be set to a callable instead.
    """

    weights_ready = Signal(str)
    use_weights = Signal(str)

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.on_use_weights: Callable[[str], Any] | None = None
        self.process: QProcess | None = None
        self.events: list[dict] = []
        self.result_path: str | None = None
        self._buffer = ""
        self._export_dir: tempfile.TemporaryDirectory | None = None
        self._steps_per_epoch = 1
        self._cancelled = False

        layout = QVBoxLayout(self)
        form = QFormLayout()
        layout.addLayout(form)
        self.source_combo = QComboBox()
        self.source_combo.addItems([SOURCE_STORE, SOURCE_PAIRS, SOURCE_VIEWER])
        form.addRow("Annotations", self.source_combo)
        path_row = QHBoxLayout()
        self.data_edit = QLineEdit()
        self.data_edit.setPlaceholderText("folder")
        browse = QPushButton("...")
        browse.clicked.connect(self._browse_data)
        path_row.addWidget(self.data_edit)
        path_row.addWidget(browse)
        form.addRow("Folder", path_row)
        self.image_layer_combo = QComboBox()
        self.labels_layer_combo = QComboBox()
        form.addRow("Image layer", self.image_layer_combo)
        form.addRow("Labels layer", self.labels_layer_combo)

        self.model_combo = QComboBox()
        self.model_combo.addItems(list(MODELS))
        form.addRow("Model", self.model_combo)
        self.classes_edit = QLineEdit()
        self.classes_edit.setPlaceholderText("every label is an object / one class (e.g. disc:>=1,cup:2)")
        self.classes_edit.setToolTip("Class channels from label values, e.g. 'disc:>=1,cup:2'; empty: instance labels")
        form.addRow("Classes", self.classes_edit)
        init_row = QHBoxLayout()
        self.init_edit = QLineEdit()
        self.init_edit.setPlaceholderText("start from these weights (optional)")
        init_browse = QPushButton("...")
        init_browse.clicked.connect(self._browse_init)
        init_row.addWidget(self.init_edit)
        init_row.addWidget(init_browse)
        form.addRow("Start from", init_row)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 10000)
        self.epochs_spin.setValue(50)
        form.addRow("Epochs", self.epochs_spin)
        self.size_spin = QSpinBox()
        self.size_spin.setRange(64, 2048)
        self.size_spin.setSingleStep(16)
        self.size_spin.setValue(512)
        form.addRow("Input size", self.size_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 256)
        self.batch_spin.setValue(4)
        form.addRow("Batch size", self.batch_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(1e-4)
        form.addRow("Learning rate", self.lr_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cuda", "cpu"])
        form.addRow("Device", self.device_combo)
        self.amp_check = QCheckBox("mixed precision (GPU)")
        self.resume_check = QCheckBox("resume the last run")
        form.addRow("", self.amp_check)
        form.addRow("", self.resume_check)
        out_row = QHBoxLayout()
        self.out_edit = QLineEdit(str(Path.home() / "hrmedseg_models" / "my_model.pt"))
        out_browse = QPushButton("...")
        out_browse.clicked.connect(self._browse_out)
        out_row.addWidget(self.out_edit)
        out_row.addWidget(out_browse)
        form.addRow("Save as", out_row)

        buttons = QHBoxLayout()
        self.train_button = QPushButton("Train")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        layout.addWidget(self.progress)
        self.plot = LossPlot()
        layout.addWidget(self.plot)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        layout.addWidget(self.result_label)
        self.use_button = QPushButton("Use these weights in the annotator")
        self.use_button.setEnabled(False)
        layout.addWidget(self.use_button)
        layout.addStretch(1)

        self.train_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.use_button.clicked.connect(self._use)
        self.source_combo.currentTextChanged.connect(self._source_changed)
        layers = getattr(napari_viewer, "layers", None)
        if layers is not None and hasattr(layers, "events"):
            layers.events.inserted.connect(self._refresh_layers)
            layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self._source_changed(self.source_combo.currentText())

    # -- inputs ------------------------------------------------------------------------------
    def _browse_data(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Annotations folder")
        if path:
            self.data_edit.setText(path)

    def _browse_init(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Weights to start from", "", "Weights (*.pt *.pth)")
        if path:
            self.init_edit.setText(path)

    def _browse_out(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the trained weights as", self.out_edit.text(), "Weights (*.pt)")
        if path:
            self.out_edit.setText(path)

    def _source_changed(self, text: str) -> None:
        from_viewer = text == SOURCE_VIEWER
        self.data_edit.setEnabled(not from_viewer)
        self.image_layer_combo.setEnabled(from_viewer)
        self.labels_layer_combo.setEnabled(from_viewer)

    def _refresh_layers(self, event: Any = None) -> None:
        layers = list(getattr(self.viewer, "layers", []))
        for combo, kind in ((self.image_layer_combo, "Image"), (self.labels_layer_combo, "Labels")):
            current = combo.currentText()
            combo.clear()
            combo.addItems([layer.name for layer in layers if type(layer).__name__ == kind])
            if current:
                combo.setCurrentText(current)

    def export_viewer_annotations(self) -> Path:
        """Write the chosen image and labels layers as one images/ + masks/ pair in a temporary folder."""
        import tifffile

        names = {layer.name: layer for layer in self.viewer.layers}
        image_layer = names.get(self.image_layer_combo.currentText())
        labels_layer = names.get(self.labels_layer_combo.currentText())
        if image_layer is None or labels_layer is None:
            raise ValueError("choose an image layer and a labels layer")
        image = np.asarray(image_layer.data)
        labels = np.asarray(labels_layer.data)
        if image.shape[: labels.ndim] != labels.shape or labels.ndim != 2:
            raise ValueError(f"labels '{labels_layer.name}' {labels.shape} do not match image "
                             f"'{image_layer.name}' {image.shape}: training takes 2D images")
        if not labels.any():
            raise ValueError(f"labels layer '{labels_layer.name}' is empty: annotate some objects first")
        self._export_dir = tempfile.TemporaryDirectory(prefix="hrmedseg_train_")
        root = Path(self._export_dir.name)
        (root / "images").mkdir()
        (root / "masks").mkdir()
        tifffile.imwrite(root / "images" / "viewer.tif", image)
        tifffile.imwrite(root / "masks" / "viewer.tif", labels.astype(np.uint32))
        return root

    def command(self, data: str) -> list[str]:
        """The training command line for the current settings."""
        cmd = [sys.executable, "-m", "hrmedseg.training.cli", "finetune", "--events",
               "--model", MODELS[self.model_combo.currentText()], "--data", data, "--out", self.out_edit.text(),
               "--epochs", str(self.epochs_spin.value()), "--img-size", str(self.size_spin.value()),
               "--batch-size", str(self.batch_spin.value()), "--lr", f"{self.lr_spin.value():g}", "--log-every", "1"]
        if self.classes_edit.text().strip():
            cmd += ["--classes", self.classes_edit.text().strip()]
        if self.init_edit.text().strip():
            cmd += ["--init", self.init_edit.text().strip()]
        if self.device_combo.currentText() != "auto":
            cmd += ["--device", self.device_combo.currentText()]
        if self.amp_check.isChecked():
            cmd.append("--amp")
        if self.resume_check.isChecked():
            cmd.append("--resume")
        return cmd

    # -- running -----------------------------------------------------------------------------
    def start(self, extra_args: list[str] | None = None) -> None:
        if self.process is not None:
            return
        try:
            data = str(self.export_viewer_annotations()) if self.source_combo.currentText() == SOURCE_VIEWER \
                else self.data_edit.text().strip()
        except ValueError as err:
            self.status.setText(f"Cannot train: {err}")
            return
        if not data:
            self.status.setText("Cannot train: choose the annotations folder")
            return
        cmd = self.command(data) + list(extra_args or [])
        self.events, self.result_path, self._buffer, self._cancelled = [], None, "", False
        self.plot.clear()
        self.progress.setRange(0, 0)
        self.result_label.setText("")
        self.use_button.setEnabled(False)
        self.train_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("Starting...")
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.ProcessChannelMode.SeparateChannels)
        self.process.readyReadStandardOutput.connect(self._read_stdout)
        self.process.readyReadStandardError.connect(self._read_stderr)
        self.process.finished.connect(self._finished)
        self.process.start(cmd[0], cmd[1:])

    def cancel(self) -> None:
        """Stop the run (the last epoch's state stays: tick 'resume' to continue it)."""
        if self.process is None:
            return
        self._cancelled = True
        self.status.setText("Cancelling...")
        self.process.terminate()
        if not self.process.waitForFinished(5000):
            self.process.kill()

    def _read_stderr(self) -> None:
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardError()).decode(errors="replace")
        lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
        for line in lines:
            if "error" in line.lower() or "warning" in line.lower() or line.startswith("skipping"):
                self.status.setText(line)

    def _read_stdout(self) -> None:
        if self.process is None:
            return
        self._buffer += bytes(self.process.readAllStandardOutput()).decode(errors="replace")
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.startswith(EVENT_PREFIX):
                try:
                    self.handle_event(json.loads(line[len(EVENT_PREFIX):]))
                except json.JSONDecodeError:
                    continue

    def handle_event(self, event: dict) -> None:
        """Update the dock from one training event (public for tests)."""
        self.events.append(event)
        kind = event.get("event")
        if kind == "start":
            self._steps_per_epoch = max(1, int(event["steps_per_epoch"]))
            self.progress.setRange(0, self._steps_per_epoch * int(event["epochs"]))
            self.status.setText(f"Training on {event['train_images']} images ({event['val_images']} held out) "
                                f"on {event['device']}")
        elif kind == "baseline":
            self.status.setText(f"Before training: held-out Dice {_fmt(event.get('val_dice'))}")
        elif kind == "step":
            self.progress.setValue(min(int(event["step"]), self.progress.maximum()))
            self.plot.add(event["step"], event["loss"])
        elif kind == "epoch":
            self.plot.add(event["step"], event.get("val_loss"), validation=True)
            self.status.setText(f"Epoch {event['epoch']}: loss {_fmt(event['train_loss'])}, held-out Dice "
                                f"{_fmt(event.get('val_dice'))} (best {_fmt(event.get('best_val_dice'))})")
        elif kind == "done":
            self.result_path = event["out"]
            self.result_label.setText(
                f"Held-out Dice: {_fmt(event.get('val_dice_before'))} before -> {_fmt(event.get('best_val_dice'))} "
                f"after ({event['epochs']} epochs, {event['stopped']}). Weights: {event['out']}")
            self.weights_ready.emit(event["out"])
        elif kind == "error":
            self.status.setText(f"Training failed: {event['message']}")

    def _finished(self, exit_code: int, exit_status: Any = None) -> None:
        # Qt may report the exit before the last output was read: read it now, so the final
        # "error" or "done" event is never lost.
        self._read_stderr()
        self._read_stdout()
        if self._buffer:
            self._buffer += "\n"
            self._read_stdout()
        self.process = None
        self.train_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, max(self.progress.maximum(), 1))
        if self.result_path:
            self.progress.setValue(self.progress.maximum())
            self.use_button.setEnabled(True)
            self.status.setText("Done.")
        elif self._cancelled:
            self.status.setText("Cancelled. Tick 'resume the last run' to continue from the last finished epoch.")
        else:
            errors = [e["message"] for e in self.events if e.get("event") == "error"]
            # stderr lines may have replaced the status since: the error event is what to show
            self.status.setText(f"Training failed: {errors[-1]}" if errors
                                else f"Training stopped (exit code {exit_code}); see the terminal for details.")

    def _use(self) -> None:
        if not self.result_path:
            return
        self.use_weights.emit(self.result_path)
        if self.on_use_weights is not None:
            self.on_use_weights(self.result_path)
            return
        annotator_dock = annotator_widget_for(self.viewer)
        if annotator_dock is not None:
            annotator_dock.set_model(self.result_path)  # selects the file in its Model box too
            self.status.setText(f"The annotator now uses {self.result_path}")
        else:
            self.status.setText("Open the HRMedSeg annotator and choose this file: " + self.result_path)


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"

