"""Clicks in the annotator (run under xvfb-run): positive, negative (Alt and the dock's toggle),
undo, delete, and objects started by clicks alone.

Masks come from the real engine with a small random HRMedSegSAM (test_plugin_annotator's
fixtures); each expectation is recomputed with the same predictor and prompts, so the tests
check the plumbing (which object, which prompts, which crop, undo), not mask quality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch._dynamo  # noqa: F401  (before napari's OpenGL context: see test_plugin_annotator)

from napari.utils._test_utils import read_only_mouse_event
from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks
from test_plugin_annotator import _drag, _wait, annotator  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def predictor():
    """test_plugin_annotator's random model with SAM's click update: every click recomputes the
    whole mask, so each click visibly changes it (the default "local" update may leave a random
    model's mask as it was; it is tested in test_engine_clicks)."""
    import torch

    from hrmedseg.engine import BoxPredictor
    from hrmedseg.models import EncoderConfig, build_encoder, build_hrmedseg_sam

    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))
    return BoxPredictor(build_hrmedseg_sam(encoder=encoder).eval(), device="cpu", click_update="sam", click_mask_prompt=True)

pytestmark = pytest.mark.gui

BOX_CORNERS = ((60, 70), (110, 130))  # (y, x) drag of the box: x 70..130, y 60..110


def _click(layer, pos, modifiers=()):
    for kind in ("mouse_press", "mouse_release"):
        callbacks = mouse_press_callbacks if kind == "mouse_press" else mouse_release_callbacks
        callbacks(layer, read_only_mouse_event(type=kind, position=tuple(pos), modifiers=list(modifiers)))


def _expected(predictor, ann, obj_box, clicks, mask_from=None):  # noqa: F811
    """The mask the engine gives for these prompts (mask prompt and crop of an earlier result),
    with the annotator's crop planning."""
    from hrmedseg.engine import interactive_policy
    from napari_hrmedseg._layer_image import LayerImage

    extra = {} if mask_from is None else dict(mask_inputs=[mask_from.low_res_logits], crops=[mask_from.crop])
    xy = np.array([c[:2] for c in clicks], float).reshape(-1, 2)
    box = np.array([obj_box if obj_box is not None else [np.nan] * 4], float)
    return next(predictor.predict_boxes(LayerImage(ann.test_image), box, points=[xy], point_labels=[[c[2] for c in clicks]],
                                        object_size=ann.state.median_box_side(), policy=interactive_policy(predictor.policy), **extra))


def _labels_of(ann, oid, result):
    y0, y1, x0, x1 = result.region
    return ann.labels_layer.data[y0:y1, x0:x1] == oid


def _box_object(ann, qtbot):
    _drag(ann.boxes_layer, *BOX_CORNERS)
    _wait(qtbot, ann)
    (oid, obj), = ann.state.objects.items()
    return oid, obj


def test_positive_then_negative_click_refine_on_the_cached_crop(annotator, predictor, qtbot):  # noqa: F811
    ann = annotator
    assert ann.clicks_layer.name == "nuclei clicks"
    oid, obj = _box_object(ann, qtbot)
    box_result = _expected(predictor, ann, obj.box, [])
    assert obj.crop == box_result.crop and obj.crop.scale == 4.0  # a 60 px box: the annotator's finer crops
    ann.start_clicks()
    assert ann.viewer.layers.selection.active is ann.clicks_layer and ann.clicks_layer.mode == "add"
    encoder_calls = predictor.encoder_calls

    _click(ann.clicks_layer, (85, 100))  # inside the box: object 1, positive
    _wait(qtbot, ann)
    assert obj.clicks == [(100.0, 85.0, 1)] and obj.use_mask_prompt
    first = _expected(predictor, ann, obj.box, obj.clicks, mask_from=box_result)
    np.testing.assert_array_equal(_labels_of(ann, oid, first), first.mask)

    _click(ann.clicks_layer, (65, 75), modifiers=("Alt",))  # Alt: negative
    _wait(qtbot, ann)
    assert obj.clicks == [(100.0, 85.0, 1), (75.0, 65.0, 0)]
    second = _expected(predictor, ann, obj.box, obj.clicks, mask_from=first)
    np.testing.assert_array_equal(_labels_of(ann, oid, second), second.mask)
    assert list(ann.clicks_layer.features["label"]) == [1, 0]
    # every click reused the box's crop embedding (the expectations above too)
    assert predictor.encoder_calls == encoder_calls

    ann.widget.negative_check.setChecked(True)  # the dock's toggle: negative without Alt
    _click(ann.clicks_layer, (100, 120))
    _wait(qtbot, ann)
    assert obj.clicks[-1] == (120.0, 100.0, 0)


def test_each_click_is_one_undo_step(annotator, qtbot):  # noqa: F811
    ann = annotator
    oid, obj = _box_object(ann, qtbot)
    after_box = np.array(ann.labels_layer.data)
    ann.start_clicks()
    _click(ann.clicks_layer, (65, 75), modifiers=("Alt",))
    _wait(qtbot, ann)
    after_click = np.array(ann.labels_layer.data)
    assert not np.array_equal(after_click, after_box), "test precondition: the click changes the mask"
    ann.labels_layer.undo()
    np.testing.assert_array_equal(ann.labels_layer.data, after_box)
    ann.labels_layer.redo()
    np.testing.assert_array_equal(ann.labels_layer.data, after_click)


def test_deleting_a_click_recomputes(annotator, predictor, qtbot):  # noqa: F811
    ann = annotator
    oid, obj = _box_object(ann, qtbot)
    ann.start_clicks()
    _click(ann.clicks_layer, (85, 100))
    _click(ann.clicks_layer, (65, 75), modifiers=("Alt",))
    _wait(qtbot, ann)
    ann.clicks_layer.selected_data = {1}
    ann.clicks_layer.remove_selected()
    _wait(qtbot, ann)
    assert obj.clicks == [(100.0, 85.0, 1)] and not obj.use_mask_prompt
    expected = _expected(predictor, ann, obj.box, obj.clicks)  # no mask prompt after a deletion
    np.testing.assert_array_equal(_labels_of(ann, oid, expected), expected.mask)


def test_click_on_empty_space_starts_an_object_of_clicks_alone(annotator, predictor, qtbot):  # noqa: F811
    ann = annotator
    box_id, box_obj = _box_object(ann, qtbot)
    ann.start_clicks()
    _click(ann.clicks_layer, (85, 100))  # the box's object: a new click must not inherit its id
    _wait(qtbot, ann)
    assert len(box_obj.clicks) == 1
    ann.next_object()  # nothing selected: a click off every object starts one
    ann.start_clicks()
    _click(ann.clicks_layer, (150, 220), modifiers=("Alt",))  # a negative click alone starts nothing
    assert len(ann.clicks_layer.data) == 1 and set(ann.state.objects) == {box_id}
    _click(ann.clicks_layer, (150, 220))
    _wait(qtbot, ann)
    (new_id,) = set(ann.state.objects) - {box_id}
    obj = ann.state.objects[new_id]
    assert obj.box is None and obj.clicks == [(220.0, 150.0, 1)]
    expected = _expected(predictor, ann, None, obj.clicks)
    assert expected.crop == obj.crop and not expected.has_box
    # the crop sits at the scale of the boxes so far: the clicks-only extent is the median box side
    side = ann.state.median_box_side()
    np.testing.assert_allclose(expected.box, [220 - side / 2, 150 - side / 2, 220 + side / 2, 150 + side / 2])
    np.testing.assert_array_equal(_labels_of(ann, new_id, expected), expected.mask)

    records = {r.id: r for r in ann.annotation().objects}
    if new_id in records:  # (a random model may give it no pixel; then it has no record)
        assert records[new_id].prompt == {"type": "points", "points": [[220.0, 150.0]], "point_labels": [1]}
    ann.clicks_layer.selected_data = {1}
    ann.clicks_layer.remove_selected()  # its last click: the object goes
    assert new_id not in ann.state.objects and not (ann.labels_layer.data == new_id).any()
