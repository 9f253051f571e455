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


# -- corrections of a propagated object re-propagate it (no "Propagate" press) ----------------
def _idle(ann, qtbot):
    qtbot.waitUntil(lambda: not ann.is_busy and ann.pending == 0 and not ann.propagation.pending, timeout=300_000)


def _propagated(make_napari_viewer, qtbot):
    """A ball stack with one object boxed on slice 3 and propagated 2 slices each way (1..5)."""
    img, gt = ball_stack()
    viewer, widget = _dock(make_napari_viewer, img)
    ann = widget.annotator
    ann.propagation.max_slices = 2  # so that only a re-propagation from a later slice reaches slice 7
    viewer.dims.set_current_step(0, 3)
    _draw(ann, 3, tight_box(gt[3] == 1))
    _idle(ann, qtbot)
    (root,) = ann.state.objects
    widget.propagate_button.click()
    _idle(ann, qtbot)
    data = ann.labels_layer.data
    assert (data[5] == root).any() and not data[6:].any()
    return viewer, widget, ann, gt, root


def _objects_slices(ann, root):
    return [z for z in range(len(ann.labels_layer.data)) if (ann.labels_layer.data[z] == root).any()]


def test_a_box_correction_re_propagates_from_its_slice(make_napari_viewer, qtbot):
    viewer, widget, ann, gt, root = _propagated(make_napari_viewer, qtbot)
    before = ann.labels_layer.data.copy()
    viewer.dims.set_current_step(0, 5)
    _draw(ann, 5, tight_box(gt[5] == 1))  # over the object's mask on slice 5: a correction of it
    _idle(ann, qtbot)
    data = ann.labels_layer.data
    assert len(ann.state.objects) == 2 and set(np.unique(data)) == {0, root}  # the box's own mask became the object's
    assert 7 in _objects_slices(ann, root)  # re-propagated from slice 5 (max 2 slices), nobody pressed Propagate
    np.testing.assert_array_equal(data[:5], before[:5])  # the slices nearer to slice 3 did not change
    assert np.mean([dice(data[z] == root, gt[z] == 1) for z in range(1, 8)]) > 0.75
    ann.labels_layer.undo()  # the re-propagation is one undo step
    assert 7 not in _objects_slices(ann, root)
    widget.close()


def test_a_click_on_another_slice_corrects_the_object_there_and_re_propagates(make_napari_viewer, qtbot):
    from test_plugin_clicks import _click

    viewer, widget, ann, gt, root = _propagated(make_napari_viewer, qtbot)
    viewer.dims.set_current_step(0, 5)
    ys, xs = np.nonzero(ann.labels_layer.data[5] == root)
    ann.start_clicks()
    _click(ann.clicks_layer, (5, float(np.median(ys)), float(np.median(xs))))
    _idle(ann, qtbot)
    assert ann.state.objects[root].clicks == []  # the click holds no slice: it must not refine slice 3's prompt
    (fix,) = [oid for oid, obj in ann.state.objects.items() if oid != root]
    obj = ann.state.objects[fix]
    assert obj.slice_index == (5,) and len(obj.clicks) == 1 and obj.clicks[0][2] == 1 and obj.box is not None
    assert ann.propagation.root(fix) == root and len(ann.boxes_layer.data) == 2  # shown as a box on slice 5
    data = ann.labels_layer.data
    assert set(np.unique(data)) == {0, root} and 7 in _objects_slices(ann, root)
    assert np.mean([dice(data[z] == root, gt[z] == 1) for z in range(1, 8)]) > 0.75
    widget.close()


def test_paint_on_a_slice_is_kept_and_re_propagated_from(make_napari_viewer, qtbot):
    viewer, widget, ann, gt, root = _propagated(make_napari_viewer, qtbot)
    labels = ann.labels_layer
    viewer.dims.set_current_step(0, 5)
    ys, xs = np.nonzero(labels.data[5] == root)
    labels.brush_size = 7
    labels.paint((5, float(ys.min()) - 2, float(np.median(xs))), root)  # a bulge above the object's mask
    bulge = (labels.data[5] == root) & ~np.isin(np.arange(labels.data.shape[1])[:, None], ys)
    assert bulge.any()
    painted = labels.data[5] == root
    _idle(ann, qtbot)
    data = labels.data
    np.testing.assert_array_equal(data[5] == root, painted)  # the painted mask is kept as it is
    assert 7 in _objects_slices(ann, root) and set(np.unique(data)) == {0, root}
    assert np.mean([dice(data[z] == root, gt[z] == 1) for z in range(1, 8)]) > 0.7
    widget.close()
