"""The Train dock: a real training subprocess, progress and loss plot, before/after Dice, cancel, use."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from test_training_data import disks, write_disk_dataset

pytestmark = pytest.mark.gui

TINY = ["--encoder-preset", "tiny", "--num-workers", "0", "--device", "cpu"]


class FakeLayer:
    def __init__(self, name, data):
        self.name, self.data = name, data


class Image(FakeLayer):
    pass


class Labels(FakeLayer):
    pass


@pytest.fixture()
def data_dir(tmp_path):
    return write_disk_dataset(tmp_path / "data", images=4, disks_per_image=4, shape=(80, 80))


def make_widget(qtbot, tmp_path, layers=()):
    from napari_hrmedseg.train_widget import SOURCE_PAIRS, TrainWidget

    widget = TrainWidget(SimpleNamespace(layers=list(layers)))
    qtbot.addWidget(widget)
    widget.source_combo.setCurrentText(SOURCE_PAIRS)
    widget.out_edit.setText(str(tmp_path / "trained.pt"))
    widget.size_spin.setValue(64)
    widget.batch_spin.setValue(2)
    widget.device_combo.setCurrentText("cpu")
    return widget


def test_training_runs_in_a_subprocess_and_reports_dice(qtbot, tmp_path, data_dir):
    widget = make_widget(qtbot, tmp_path)
    widget.data_edit.setText(str(data_dir))
    widget.epochs_spin.setValue(2)
    used = []
    widget.on_use_weights = used.append
    with qtbot.waitSignal(widget.weights_ready, timeout=240_000) as ready:
        widget.start(TINY)
        assert widget.process is not None and not widget.train_button.isEnabled()
    qtbot.waitUntil(lambda: widget.process is None, timeout=30_000)
    assert ready.args == [str(tmp_path / "trained.pt")] and Path(ready.args[0]).exists()
    kinds = [e["event"] for e in widget.events]
    assert kinds[0] == "start" and "baseline" in kinds and kinds.count("epoch") == 2
    assert len(widget.plot.train) == sum(k == "step" for k in kinds) > 0 and len(widget.plot.val) == 2
    assert "before" in widget.result_label.text() and "after" in widget.result_label.text()
    assert widget.progress.value() == widget.progress.maximum()
    widget.grab()  # paints the plot with data
    assert widget.use_button.isEnabled()
    widget.use_button.click()
    assert used == [str(tmp_path / "trained.pt")]


def test_cancel_keeps_a_resumable_state(qtbot, tmp_path, data_dir):
    widget = make_widget(qtbot, tmp_path)
    widget.data_edit.setText(str(data_dir))
    widget.epochs_spin.setValue(500)
    widget.start(TINY)
    qtbot.waitUntil(lambda: any(e["event"] == "epoch" for e in widget.events), timeout=240_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.process is None, timeout=30_000)
    assert "Cancelled" in widget.status.text() and not widget.use_button.isEnabled()
    assert (tmp_path / "trained.state.pt").exists()
    assert "--resume" not in widget.command("x")
    widget.resume_check.setChecked(True)
    assert "--resume" in widget.command("x")


def test_bad_input_is_reported_in_the_dock(qtbot, tmp_path):
    widget = make_widget(qtbot, tmp_path)
    widget.data_edit.setText(str(tmp_path / "nothing_here"))
    widget.start(TINY)
    qtbot.waitUntil(lambda: widget.process is None, timeout=120_000)
    assert "training data not found" in widget.status.text()
    assert widget.train_button.isEnabled() and not widget.use_button.isEnabled()


def test_viewer_layers_are_exported_as_a_pair(qtbot, tmp_path):
    from hrmedseg.training.data import discover_samples
    from napari_hrmedseg.train_widget import SOURCE_VIEWER

    labels = disks((60, 70), n=3).astype(np.int32)
    widget = make_widget(qtbot, tmp_path, [Image("cells", np.where(labels > 0, 200, 10).astype(np.uint8)),
                                           Labels("cells masks", labels)])
    widget.source_combo.setCurrentText(SOURCE_VIEWER)
    assert widget.image_layer_combo.currentText() == "cells"
    assert widget.labels_layer_combo.currentText() == "cells masks"
    root = widget.export_viewer_annotations()
    image, exported = discover_samples(root).samples[0].load()
    assert np.array_equal(exported, labels) and image.shape == (60, 70, 3)
    widget.viewer.layers[1].data = np.zeros_like(labels)
    widget.start()
    assert "empty" in widget.status.text() and widget.process is None
