"""The dock's "Propagate" on a stack in a real napari viewer (under xvfb-run): one undo step, Cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch._dynamo  # noqa: F401  (before napari's OpenGL context: see test_plugin_annotator)

from test_propagation import ball_stack, dice, tight_box

pytestmark = pytest.mark.gui


def _dock(make_napari_viewer, image):
    from hrmedseg.engine import BoxPredictor
    from napari_hrmedseg._state import ModelInfo
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    viewer = make_napari_viewer()
    viewer.add_image(image, name="stack")
    widget = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.annotator.use_predictor(BoxPredictor("hrmedseg_sam_default", device="cpu"), ModelInfo(name="hrmedseg_sam_default"))
    return viewer, widget


def _draw(ann, z, box):
    from napari_hrmedseg._state import rectangle_from_box

    ann.boxes_layer.add_rectangles([rectangle_from_box(box, (z,))])


def test_propagate_fills_the_3d_masks_layer_in_one_undo_step(make_napari_viewer, qtbot):
    img, gt = ball_stack()
    viewer, widget = _dock(make_napari_viewer, img)
    ann = widget.annotator
    viewer.dims.set_current_step(0, 5)
    _draw(ann, 5, tight_box(gt[5] == 1))
    qtbot.waitUntil(lambda: not ann.is_busy and ann.pending == 0, timeout=120_000)
    labels = ann.labels_layer
    (oid,) = ann.state.objects
    assert labels.data[5].any() and not np.delete(labels.data, 5, axis=0).any()  # the box's own slice only
    before = labels.data.copy()
    progress = []
    ann.progress.connect(lambda d, t: progress.append((d, t)))
    widget.propagate_button.click()
    qtbot.waitUntil(lambda: not ann.is_busy, timeout=300_000)
    after = labels.data.copy()
    present = [z for z in range(len(img)) if gt[z].any()]
    assert np.mean([dice(after[z] == oid, gt[z] == 1) for z in present]) > 0.75
    assert progress and progress[-1][0] == progress[-1][1]
    viewer.dims.set_current_step(0, 8)
    viewer.screenshot("/tmp/propagate.png", canvas_only=False)
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)  # the whole propagation was one step
    labels.redo()
    np.testing.assert_array_equal(labels.data, after)
    widget.close()


def test_cancel_writes_nothing_and_a_box_on_another_slice_corrects_the_object(make_napari_viewer, qtbot):
    img, gt = ball_stack()
    viewer, widget = _dock(make_napari_viewer, img)
    ann = widget.annotator
    _draw(ann, 3, tight_box(gt[3] == 1))
    qtbot.waitUntil(lambda: not ann.is_busy and ann.pending == 0, timeout=120_000)
    (oid,) = ann.state.objects
    before = ann.labels_layer.data.copy()
    def cancel_after_first(done, total):  # Cancel after the first slice step
        if done:
            ann.cancel()

    ann.progress.connect(cancel_after_first)
    widget.propagate_button.click()
    qtbot.waitUntil(lambda: not ann.is_busy, timeout=300_000)
    np.testing.assert_array_equal(ann.labels_layer.data, before)
    ann.progress.disconnect(cancel_after_first)
    widget.propagate_button.click()
    qtbot.waitUntil(lambda: not ann.is_busy, timeout=300_000)
    assert (ann.labels_layer.data[7] == oid).any()
    # a box over the object on slice 7: a second prompt of the same object, not a new object's labels
    _draw(ann, 7, tight_box(gt[7] == 1))
    qtbot.waitUntil(lambda: not ann.is_busy and ann.pending == 0, timeout=120_000)
    widget.propagate_button.click()
    qtbot.waitUntil(lambda: not ann.is_busy, timeout=300_000)
    data = ann.labels_layer.data
    assert set(np.unique(data)) == {0, oid}
    assert np.mean([dice(data[z] == oid, gt[z] == 1) for z in range(1, 10)]) > 0.75
    widget.close()
