"""The dock's "Find all" button (segment every object) in a real napari viewer, under xvfb-run."""

from __future__ import annotations

import numpy as np
import pytest
import torch._dynamo  # noqa: F401  (before napari's OpenGL context: see test_plugin_annotator)

from hrmedseg.data import load_sample

pytestmark = pytest.mark.gui


def test_find_all_adds_boxed_objects_in_one_undo_step(make_napari_viewer, qtbot):
    from hrmedseg.engine import BoxPredictor
    from napari_hrmedseg._state import ModelInfo
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    viewer = make_napari_viewer()
    viewer.add_image(load_sample("nuclei_fluorescence")[:192, :256], name="nuclei")
    widget = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    ann = widget.annotator
    predictor = BoxPredictor("hrmedseg_sam_default", device="cpu")
    ann.use_predictor(predictor, ModelInfo(name="hrmedseg_sam_default"))
    widget.every_object_button.click()
    qtbot.waitUntil(lambda: not ann.is_busy and ann.pending == 0, timeout=300_000)
    labels = ann.labels_layer
    ids = sorted(set(np.unique(labels.data)) - {0})
    assert len(ids) >= 5  # the sample holds a few dozen nuclei
    assert sorted(ann.state.objects) == ids and all(ann.state.objects[i].box is not None for i in ids)
    assert len(ann.boxes_layer.data) == len(ids)
    assert sorted(ann.boxes_layer.features["object_id"]) == ids
    calls = predictor.encoder_calls + predictor.decoder_calls
    qtbot.wait(200)
    assert predictor.encoder_calls + predictor.decoder_calls == calls  # the boxes were not recomputed
    after = labels.data.copy()
    labels.undo()
    assert not labels.data.any()  # every mask went in one step
    labels.redo()
    np.testing.assert_array_equal(labels.data, after)
    viewer.screenshot("/tmp/find_all.png", canvas_only=False)
    widget.close()
