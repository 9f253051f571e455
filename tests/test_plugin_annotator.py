"""The annotator dock in a real napari viewer (run under xvfb-run): boxes -> masks, undo, commit/reopen.

Masks come from the real engine (``hrmedseg.engine.BoxPredictor``) with a small randomly
initialised HRMedSegSAM; each expectation is recomputed with the same predictor, so the tests
check the plumbing (which object, where, undo, store), not mask quality.
"""

from __future__ import annotations

import numpy as np
import pytest
# triton (imported by torch._dynamo) must load before napari creates an OpenGL context, or it
# segfaults under Mesa; napari_hrmedseg guards real sessions (see test_model_loads_inside_a_running_napari)
import torch._dynamo  # noqa: F401, E402

from hrmedseg.data import load_sample
from napari.utils._test_utils import read_only_mouse_event
from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

pytestmark = pytest.mark.gui


# ----------------------------------------------------------------------------- helpers
def _drag(layer, start, end, steps=4):
    """Press at ``start``, move to ``end`` and release, as a mouse on the canvas does (data coords)."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", position=tuple(start), is_dragging=True))
    for t in np.linspace(0, 1, steps):
        pos = tuple(start + t * (end - start))
        mouse_move_callbacks(layer, read_only_mouse_event(type="mouse_move", position=pos, is_dragging=True))
    mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", position=tuple(end), is_dragging=True))


def _click(layer, pos):
    mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", position=tuple(pos)))
    mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", position=tuple(pos)))


def annotator_box(predictor, image, box):
    """The engine's mask for one box as the annotator asks for it: crops of ``interactive_policy``."""
    from hrmedseg.engine import interactive_policy

    return next(predictor.predict_boxes(image, np.asarray(box, float).reshape(1, 4), policy=interactive_policy(predictor.policy)))


def _expected_labels(predictor, image, boxes_by_id, shape):
    """Labels the annotator should show: each box's mask pasted in id order (new wins)."""
    from hrmedseg.engine import paste_object
    from napari_hrmedseg._layer_image import LayerImage

    labels = np.zeros(shape, np.uint32)
    for oid, box in sorted(boxes_by_id.items()):
        paste_object(labels, annotator_box(predictor, LayerImage(image), box), oid, overlap="new_wins")
    return labels


@pytest.fixture(scope="module")
def predictor():
    import torch

    from hrmedseg.engine import BoxPredictor
    from hrmedseg.models import EncoderConfig, build_encoder, build_hrmedseg_sam

    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))
    return BoxPredictor(build_hrmedseg_sam(encoder=encoder).eval(), device="cpu")


@pytest.fixture
def annotator(make_napari_viewer, predictor, qtbot):
    from napari_hrmedseg._state import ModelInfo
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    viewer = make_napari_viewer()
    image = load_sample("nuclei_fluorescence")[:192, :256]
    viewer.add_image(image, name="nuclei")
    widget = AnnotatorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    ann = widget.annotator
    ann.use_predictor(predictor, ModelInfo(name="random-test", untrained=True))
    ann.test_image = image
    ann.widget = widget
    yield ann
    ann.cancel()
    qtbot.waitUntil(lambda: not ann.is_busy, timeout=60_000)


def _wait(qtbot, ann):
    qtbot.waitUntil(lambda: ann.pending == 0, timeout=120_000)


# ----------------------------------------------------------------------------- tests
def test_layers_and_rectangle_mode(annotator):
    ann = annotator
    assert ann.labels_layer.name.startswith("nuclei masks")
    assert ann.boxes_layer.name == "nuclei boxes"
    assert ann.boxes_layer.mode == "add_rectangle"
    assert ann.labels_layer.data.shape == ann.test_image.shape
    # untrained weights are labelled where the masks are shown
    assert "UNTRAINED" in ann.labels_layer.name
    assert ann.widget.banner.isVisibleTo(ann.widget)


def test_draw_move_delete_boxes_change_labels(annotator, predictor, qtbot):
    ann = annotator
    boxes, image = ann.boxes_layer, ann.test_image
    # draw two boxes with the mouse in rectangle mode ((y, x) data coordinates)
    _drag(boxes, (20, 30), (70, 90))
    _drag(boxes, (100, 140), (170, 230))
    _wait(qtbot, ann)
    assert list(boxes.features["object_id"]) == [1, 2]
    box1, box2 = ann.state.objects[1].box, ann.state.objects[2].box
    expected = _expected_labels(predictor, image, {1: box1, 2: box2}, image.shape)
    assert set(np.unique(expected)) == {0, 1, 2}, "test precondition: both random-weight masks non-empty"
    np.testing.assert_array_equal(ann.labels_layer.data, expected)

    # move box 1 with the mouse (select mode: click it, then drag it 15 px down, 25 px right)
    boxes.mode = "select"
    centre = np.mean(boxes.data[0], axis=0)
    _click(boxes, centre)
    _drag(boxes, centre, centre + (15, 25))
    _wait(qtbot, ann)
    moved = ann.state.objects[1].box
    assert moved == pytest.approx((box1[0] + 25, box1[1] + 15, box1[2] + 25, box1[3] + 15))
    expected = _expected_labels(predictor, image, {1: moved, 2: box2}, image.shape)
    np.testing.assert_array_equal(ann.labels_layer.data, expected)

    # resize box 2 (what dragging a corner handle ends in: new vertices + a "changed" event)
    from napari_hrmedseg._state import rectangle_from_box

    bigger = (box2[0] - 10, box2[1] - 10, box2[2], box2[3])
    data = list(boxes.data)
    data[1] = rectangle_from_box(bigger)
    boxes.data = data
    _wait(qtbot, ann)
    assert list(boxes.features["object_id"]) == [1, 2]
    expected = _expected_labels(predictor, image, {1: moved, 2: bigger}, image.shape)
    np.testing.assert_array_equal(ann.labels_layer.data, expected)

    # delete box 1: object 1 disappears, object 2 stays as it was
    boxes.selected_data = {0}
    boxes.remove_selected()
    _wait(qtbot, ann)
    assert 1 not in ann.state.objects
    assert not np.any(ann.labels_layer.data == 1)
    np.testing.assert_array_equal(ann.labels_layer.data == 2, expected == 2)


def test_undo_redo_restore_masks(annotator, qtbot):
    ann = annotator
    labels = ann.labels_layer
    _drag(ann.boxes_layer, (20, 30), (80, 100))
    _wait(qtbot, ann)
    after_first = labels.data.copy()
    assert np.any(after_first == 1)
    _drag(ann.boxes_layer, (90, 120), (160, 200))
    _wait(qtbot, ann)
    after_second = labels.data.copy()
    assert np.any(after_second == 2)
    # napari's own history (what Ctrl+Z / Ctrl+Shift+Z on the labels layer call)
    labels.undo()
    np.testing.assert_array_equal(labels.data, after_first)
    labels.undo()
    assert not labels.data.any()
    labels.redo()
    labels.redo()
    np.testing.assert_array_equal(labels.data, after_second)


def test_commit_and_reopen_round_trip(annotator, qtbot, tmp_path, make_napari_viewer):
    from hrmedseg.store import AnnotationStore

    ann = annotator
    _drag(ann.boxes_layer, (20, 30), (80, 100))
    _drag(ann.boxes_layer, (100, 140), (170, 230))
    _wait(qtbot, ann)
    # a person corrects: paints part of object 1 away and adds a hand-painted object 7
    ys, xs = np.nonzero(ann.labels_layer.data == 1)
    painted = (ys[: len(ys) // 2], xs[: len(xs) // 2])
    ann.labels_layer.data_setitem(painted, 0)
    ann.labels_layer.data_setitem((np.array([5, 5, 6]), np.array([5, 6, 5])), 7)
    assert ann.state.dirty
    project = tmp_path / "project"
    ann.widget.project_edit.setText(str(project))
    ann.widget.commit()
    _wait(qtbot, ann)
    assert not ann.state.dirty

    store = AnnotationStore.open(project)
    assert store.image_keys() == [ann.image_key()]
    saved = store.load(ann.image_key())
    np.testing.assert_array_equal(saved.labels, ann.labels_layer.data)
    by_id = {o.id: o for o in saved.objects}
    assert set(by_id) == {1, 2, 7}
    assert by_id[1].edited and not by_id[2].edited and by_id[7].edited
    assert by_id[1].prompt["type"] == "box" and by_id[7].prompt["type"] == "paint"
    assert by_id[2].box_xyxy == pytest.approx(ann.state.objects[2].box)
    assert by_id[2].model["name"] == "random-test" and by_id[2].model.get("untrained") is True

    # a fresh viewer with the same image reopens the project: layers come back
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    viewer2 = make_napari_viewer()
    viewer2.add_image(ann.test_image, name="nuclei")
    widget2 = AnnotatorWidget(viewer2)
    widget2.project_edit.setText(str(project))
    assert widget2.open_project()
    ann2 = widget2.annotator
    np.testing.assert_array_equal(ann2.labels_layer.data, saved.labels)
    assert sorted(ann2.boxes_layer.features["object_id"]) == [1, 2]
    assert ann2.state.objects[1].box == pytest.approx(by_id[1].box_xyxy)
    # new objects after reopening get fresh ids
    assert ann2.next_object() == 8 and ann2.labels_layer.selected_label == 8
    widget2.close()


def test_segment_all_with_progress_and_cancel(annotator, predictor, qtbot):
    from napari_hrmedseg._state import rectangle_from_box

    ann = annotator
    image = ann.test_image
    boxes = {i + 1: (10.0 + 40 * (i % 5), 10.0 + 60 * (i // 5), 45.0 + 40 * (i % 5), 60.0 + 60 * (i // 5)) for i in range(10)}
    ann.predictor = None  # add boxes first, segment them all at once
    ann.boxes_layer.add_rectangles([rectangle_from_box(b) for b in boxes.values()])
    assert sorted(ann.state.objects) == list(boxes)
    ann.predictor = predictor
    seen = []
    ann.progress.connect(lambda done, total: seen.append((done, total)))
    ann.segment_all()
    _wait(qtbot, ann)
    assert seen[0] == (0, 10) and seen[-1] == (10, 10)
    assert [d for d, _ in seen] == list(range(11))
    expected = _expected_labels(predictor, image, boxes, image.shape)
    np.testing.assert_array_equal(ann.labels_layer.data, expected)

    # cancel: stops early, keeps what was written, leaves no worker behind
    ann.labels_layer.data = np.zeros_like(ann.labels_layer.data)
    seen.clear()
    ann.progress.connect(lambda done, total: ann.cancel() if done == 3 else None)
    ann.segment_all()
    _wait(qtbot, ann)
    assert 3 <= seen[-1][0] < 10
    assert len(set(np.unique(ann.labels_layer.data)) - {0}) <= seen[-1][0]


def test_shortcuts_are_bound_and_documented(annotator, qtbot, tmp_path):
    from napari.utils.key_bindings import KeyBinding

    from napari_hrmedseg.annotator_widget import SHORTCUTS

    ann, widget = annotator, annotator.widget
    for key in SHORTCUTS:
        assert key.replace("-", "+") in widget.toolTip()
    keymap = ann.viewer.keymap

    def press(key):
        keymap[KeyBinding.from_str(key)](ann.viewer)

    # N: next object -> a fresh label id for painting and rectangle mode on the boxes layer
    ann.boxes_layer.mode = "select"
    press("N")
    assert ann.labels_layer.selected_label == 1 and ann.boxes_layer.mode == "add_rectangle"
    _drag(ann.boxes_layer, (20, 30), (80, 100))
    _wait(qtbot, ann)
    assert np.any(ann.labels_layer.data == 1)
    press("N")
    assert ann.labels_layer.selected_label == 2
    # Shift+S: commit into the project folder typed in the dock
    widget.project_edit.setText(str(tmp_path / "proj"))
    press("Shift-S")
    _wait(qtbot, ann)
    assert (tmp_path / "proj" / "project.json").is_file()
    # Shift+C: clear boxes and masks; Ctrl+Z on the masks layer brings the mask back
    before = ann.labels_layer.data.copy()
    press("Shift-C")
    _wait(qtbot, ann)
    assert len(ann.boxes_layer.data) == 0 and not ann.labels_layer.data.any() and not ann.state.objects
    ann.labels_layer.undo()
    np.testing.assert_array_equal(ann.labels_layer.data, before)


def test_nd_stack_uses_the_slice_on_screen(make_napari_viewer, predictor, qtbot):
    from napari_hrmedseg._layer_image import LayerImage
    from napari_hrmedseg._state import ModelInfo
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    viewer = make_napari_viewer()
    base = load_sample("nuclei_fluorescence")[:128, :160]
    stack = np.stack([np.roll(base, 20 * k, axis=1) for k in range(3)])
    viewer.add_image(stack, name="stack")
    widget = AnnotatorWidget(viewer)
    ann = widget.annotator
    ann.use_predictor(predictor, ModelInfo(name="random-test", untrained=True))
    assert ann.labels_layer.data.shape == stack.shape and ann.boxes_layer.ndim == 3
    viewer.dims.set_point(0, 1)
    _drag(ann.boxes_layer, (1, 20, 30), (1, 80, 100))
    _wait(qtbot, ann)
    obj = ann.state.objects[1]
    assert obj.slice_index == (1,)
    expected = np.zeros(base.shape, np.uint32)
    from hrmedseg.engine import paste_object

    paste_object(expected, annotator_box(predictor, LayerImage(stack, slice_index=(1,)), obj.box), 1)
    assert expected.any()
    np.testing.assert_array_equal(ann.labels_layer.data[1], expected)
    assert not ann.labels_layer.data[0].any() and not ann.labels_layer.data[2].any()
    widget.close()


def test_rgb_layer(make_napari_viewer, predictor, qtbot):
    from napari_hrmedseg._state import ModelInfo
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    viewer = make_napari_viewer()
    viewer.add_image(load_sample("nuclei_stained"), name="stained", rgb=True)
    widget = AnnotatorWidget(viewer)
    ann = widget.annotator
    ann.use_predictor(predictor, ModelInfo(name="random-test", untrained=True))
    assert ann.labels_layer.data.shape == (256, 320)
    _drag(ann.boxes_layer, (30, 40), (90, 120))
    _wait(qtbot, ann)
    region = ann.state.objects[1].predicted_region
    assert region is not None and ann.state.objects[1].predicted_mask.shape == (region[1] - region[0], region[3] - region[2])
    widget.close()


def test_hrmedseg_sam2_bundle_loads_and_segments(make_napari_viewer, qtbot, tmp_path):
    """A fine-tuned HRMedSegSAM2 file chosen in the dock runs in the annotator (the box engine's SAM2 steps)."""
    pytest.importorskip("sam2")
    import torch

    from hrmedseg.engine.decoder import Sam2BoxDecoder
    from hrmedseg.models import EncoderConfig, build_encoder
    from hrmedseg.models.sam2 import build_hrmedseg_sam2, save_hrmedseg_sam2
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    torch.manual_seed(0)
    model = build_hrmedseg_sam2(encoder=build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))))
    path = save_hrmedseg_sam2(model, tmp_path / "my_sam2.pt", provenance={"source": "test"})

    viewer = make_napari_viewer()
    image = load_sample("nuclei_fluorescence")[:192, :256]
    viewer.add_image(image, name="nuclei")
    widget = AnnotatorWidget(viewer)
    ann = widget.annotator
    widget.device_combo.setCurrentText("cpu")
    widget.set_model(str(path))
    qtbot.waitUntil(lambda: ann.predictor is not None, timeout=120_000)
    assert isinstance(ann.predictor.decoder, Sam2BoxDecoder)
    assert ann.state.model.name == "my_sam2.pt" and ann.state.model.path == str(path.resolve())

    _drag(ann.boxes_layer, (40, 60), (120, 170))
    _wait(qtbot, ann)
    box = ann.state.objects[1].box
    expected = _expected_labels(ann.predictor, image, {1: box}, image.shape)
    assert expected.any(), "test precondition: a non-empty random-weight mask"
    np.testing.assert_array_equal(ann.labels_layer.data, expected)
    widget.close()
