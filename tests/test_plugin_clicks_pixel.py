"""Clicks in the annotator with the engine's default "pixel" click update (run under xvfb-run):
each click sets its own pixel in the masks layer, on top of the box's mask, and undo restores it.

test_plugin_clicks checks the plumbing with SAM's update; this file checks the default end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch._dynamo  # noqa: F401  (before napari's OpenGL context: see test_plugin_annotator)

from test_plugin_annotator import _drag, _wait, annotator  # noqa: F401  (fixtures)
from test_plugin_clicks import BOX_CORNERS, _click

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def predictor():
    """test_plugin_annotator's small random model with the engine's default click update."""
    import torch

    from hrmedseg.engine import BoxPredictor
    from hrmedseg.models import EncoderConfig, build_encoder, build_hrmedseg_sam

    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))
    return BoxPredictor(build_hrmedseg_sam(encoder=encoder).eval(), device="cpu")


def test_each_click_sets_its_pixel_and_undo_restores_the_box_mask(annotator, predictor, qtbot):  # noqa: F811
    ann = annotator
    assert predictor.click_update == "pixel"
    _drag(ann.boxes_layer, *BOX_CORNERS)
    _wait(qtbot, ann)
    (oid, obj), = ann.state.objects.items()
    box_mask = ann.labels_layer.data == oid
    (y0, y1), (x0, x1) = BOX_CORNERS[0], BOX_CORNERS[1]
    inside = [(y, x) for y in range(y0, y1) for x in range(x0, x1) if box_mask[y, x]]
    outside = [(y, x) for y in range(y0, y1) for x in range(x0, x1) if not box_mask[y, x]]
    assert inside and outside, "the random model's box mask should cover part of its box"
    ann.start_clicks()
    encoder_calls = predictor.encoder_calls

    positive = outside[len(outside) // 2]
    _click(ann.clicks_layer, positive)
    _wait(qtbot, ann)
    assert ann.labels_layer.data[positive] == oid
    after_positive = ann.labels_layer.data == oid

    negative = inside[len(inside) // 2]
    _click(ann.clicks_layer, negative, modifiers=("Alt",))
    _wait(qtbot, ann)
    assert ann.labels_layer.data[negative] != oid
    assert predictor.encoder_calls == encoder_calls  # the box's cached crop served every click

    ann.labels_layer.undo()
    np.testing.assert_array_equal(ann.labels_layer.data == oid, after_positive)
