"""The box prior rule "gate": a fitted per-object choice between the model's mask and the ellipse."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from hrmedseg.engine import BoxPredictor
from hrmedseg.errors import WeightsError
from hrmedseg.models import load_model_with_metadata, save_hrmedseg_sam
from hrmedseg.models.box_prior import apply_prior_rule, ellipse_prior_logits
from hrmedseg.models.prior_gate import GATE_FEATURES, PriorGate, gate_features, gate_path
from test_engine_predictor import tiny_sam

SIZE = (1024, 1024)
BOX = torch.tensor([[300.0, 280.0, 700.0, 760.0]])  # a disc-sized box


@pytest.fixture(scope="module")
def shipped_gate() -> PriorGate:
    gate = load_model_with_metadata("hrmedseg_sam_default").metadata.prior_gate
    assert gate is not None, "the shipped default carries its fitted gate"
    return gate


def _ellipse() -> torch.Tensor:
    return ellipse_prior_logits(BOX, (256, 256), SIZE)


def _l_shape() -> torch.Tensor:
    """Confident logits (+-10) of an L-shaped object in the box: far from any ellipse."""
    m = torch.full((1, 1, 256, 256), -10.0)
    m[..., 70:190, 75:100] = 10
    m[..., 165:190, 75:175] = 10
    return m


def test_features_of_the_ellipse_itself():
    ellipse = _ellipse()
    f = dict(zip(GATE_FEATURES, gate_features(ellipse, torch.tensor([0.9]), BOX, SIZE, ellipse)[0].tolist()))
    assert f["score"] == pytest.approx(0.9)
    assert f["iou_ellipse"] == 1.0
    assert f["aspect"] == pytest.approx(400 / 480)
    assert f["log_box_area"] == pytest.approx(np.log(400 * 480 / 1024**2), abs=1e-4)
    assert f["box_fill"] == pytest.approx(np.pi / 4, abs=0.02)  # an ellipse fills pi/4 of its box
    assert 0 < f["boundary_margin"] < 1  # the prior's logits are near 0 on its outline


def test_features_on_the_occupied_window_equal_the_whole_grid(monkeypatch):
    """Masks at the grid's border, a hole, scattered small objects and an empty mask: the
    windowed features (prior_gate._occupied_window) are the whole grid's."""
    import hrmedseg.models.prior_gate as prior_gate

    boxes = torch.tensor([[0.0, 0.0, 90.0, 60.0], [900.0, 980.0, 1024.0, 1024.0], [400.0, 500.0, 412.0, 509.0], [600.0, 100.0, 700.0, 180.0]])
    ellipse = ellipse_prior_logits(boxes, (256, 256), SIZE)
    logits = ellipse + torch.randn(ellipse.shape, generator=torch.Generator().manual_seed(0)) * 3  # ragged outlines
    logits[0, :, 0:4, 0:30] = 15  # touches the top-left corner
    logits[1, :, 252:256, 240:256] = 8  # the bottom-right corner
    logits[3, :, 30:40, 160:170] = -12  # a hole
    logits[2] = -1e4  # empty (a region decoder's fill)
    scores = torch.tensor([0.9, 0.8, 0.3, 0.95])
    windowed = gate_features(logits, scores, boxes, SIZE, ellipse)
    for i in range(4):  # one object at a time too: each its own window
        assert torch.allclose(gate_features(logits[i : i + 1], scores[i : i + 1], boxes[i : i + 1], SIZE, ellipse[i : i + 1])[0], windowed[i])
    monkeypatch.setattr(prior_gate, "_occupied_window", lambda occupied: (slice(None), slice(None)))
    whole = gate_features(logits, scores, boxes, SIZE, ellipse)
    assert windowed[2, 4] == 0 and windowed[0, 5] > 0  # the empty mask has no fill; the others an outline
    assert torch.allclose(windowed, whole, rtol=1e-6, atol=0)


def test_shipped_gate_prefers_the_ellipse_over_a_poor_near_ellipse(shipped_gate):
    ellipse = _ellipse()
    shifted = torch.roll(ellipse, shifts=5, dims=-1)  # a soft, shifted near-ellipse: IoU ~0.88
    out = apply_prior_rule(shifted, torch.tensor([0.9]), BOX, SIZE, "gate", shipped_gate)
    assert torch.equal(out, ellipse)


@pytest.mark.parametrize("score", [0.7, 0.95])
def test_shipped_gate_keeps_a_confident_non_elliptic_mask(shipped_gate, score):
    l_shape = _l_shape()
    out = apply_prior_rule(l_shape, torch.tensor([score]), BOX, SIZE, "gate", shipped_gate)
    assert torch.equal(out, l_shape)


def test_gate_is_per_object_and_reuses_given_ellipse_logits():
    # A gate that only looks at IoU(mask, ellipse): the ellipse wherever it is above 0.5.
    gate = PriorGate(weights=(0, 10, 0, 0, 0, 0), bias=0.0, mean=(0, 0.5, 0, 0, 0, 0), std=(1,) * 6)
    ellipse = _ellipse()
    logits = torch.cat([torch.roll(ellipse, 3, dims=-1), _l_shape()])
    boxes = BOX.repeat(2, 1)
    out = apply_prior_rule(logits, torch.tensor([0.9, 0.9]), boxes, SIZE, "gate", gate, ellipse.repeat(2, 1, 1, 1))
    assert torch.equal(out[0], ellipse[0]) and torch.equal(out[1], logits[1])
    assert torch.equal(apply_prior_rule(logits, torch.tensor([0.9, 0.9]), boxes, SIZE, "gate", None), logits)


def test_gate_round_trips_and_bad_parameters_are_refused(tmp_path):
    gate = PriorGate((1.0, -2, 0, 0, 0.5, 0), 0.25, (0.0,) * 6, (1.0,) * 6, provenance={"fitted_on": "x"})
    assert PriorGate.from_dict(json.loads(json.dumps(gate.to_dict()))) == gate
    with pytest.raises(WeightsError, match="6 finite weights"):
        PriorGate((1.0,) * 5, 0.0, (0.0,) * 5, (1.0,) * 5)
    with pytest.raises(WeightsError, match="features"):
        PriorGate((1.0,) * 6, 0.0, (0.0,) * 6, (1.0,) * 6, features=("a",) * 6)
    with pytest.raises(WeightsError, match="not a prior gate"):
        PriorGate.from_dict({"weights": [1.0] * 6})


@pytest.fixture()
def model_path(tmp_path):
    return save_hrmedseg_sam(tiny_sam(seed=5), tmp_path / "m.pt", box_prior="ellipse")


def test_loader_reads_the_gate_beside_the_weights(model_path):
    assert load_model_with_metadata(model_path).metadata.prior_gate is None
    gate = PriorGate((0.0, 1, 0, 0, 0, 0), -0.5, (0.0,) * 6, (1.0,) * 6)
    gate_path(model_path).write_text(json.dumps(gate.to_dict()))
    assert gate_path(model_path).name == "m.prior_gate.json"
    assert load_model_with_metadata(model_path).metadata.prior_gate == gate
    predictor = BoxPredictor(model_path, device="cpu", prior="gate")
    assert predictor.prior == "gate"
    gate_path(model_path).write_text("{not json")
    with pytest.raises(WeightsError, match="m.prior_gate.json"):
        load_model_with_metadata(model_path)


def test_model_without_a_gate_falls_back_to_its_own_masks(model_path, caplog):
    image = np.random.default_rng(1).integers(0, 255, (300, 400, 3), np.uint8)
    box = np.array([50.0, 60.0, 130.0, 100.0])
    with caplog.at_level(logging.WARNING, logger="hrmedseg.engine.predictor"):
        gated = BoxPredictor(model_path, device="cpu", backend="reference", prior="gate")
    assert gated.prior == "model"
    assert "no fitted prior gate" in caplog.text and "m.pt" in caplog.text
    plain = BoxPredictor(model_path, device="cpu", backend="reference", prior="model")
    assert np.array_equal(gated.predict_box(image, box).mask, plain.predict_box(image, box).mask)


def test_cli_takes_prior_gate(model_path):
    from hrmedseg.cli import build_parser
    from hrmedseg.cli.segment import load_predictor

    argv = ["segment", "img.png", "--out", "l.tif", "--model", "hrmedseg_sam_default", "--device", "cpu", "--no-disk-cache"]
    assert load_predictor(build_parser().parse_args([*argv, "--prior", "gate"])).prior == "gate"


def test_default_prior_is_the_gate_where_the_model_has_one(model_path, caplog):
    assert BoxPredictor("hrmedseg_sam_default", device="cpu").prior == "gate"
    with caplog.at_level(logging.WARNING, logger="hrmedseg.engine.predictor"):
        plain = BoxPredictor(model_path, device="cpu", backend="reference")
    assert plain.prior == "model" and "no fitted prior gate" not in caplog.text  # no gate, nothing to warn of


def test_gate_never_replaces_a_clicked_or_mask_prompted_mask(model_path):
    # A gate that always picks the ellipse: box-only masks become ellipses, corrected ones stay the model's.
    always = PriorGate((0.0,) * 6, 50.0, (0.0,) * 6, (1.0,) * 6)
    gate_path(model_path).write_text(json.dumps(always.to_dict()))
    image = np.random.default_rng(2).integers(0, 255, (300, 400, 3), np.uint8)
    boxes = np.array([[50.0, 60.0, 130.0, 100.0]])
    clicks = dict(points=[np.array([[90.0, 80.0], [60.0, 95.0]])], point_labels=[np.array([1, 0])])
    # "local": clicks re-decode the object (the "pixel" default keeps the box's mask, below).
    gated = BoxPredictor(model_path, device="cpu", backend="reference", prior="gate", click_update="local")
    plain = BoxPredictor(model_path, device="cpu", backend="reference", prior="model", click_update="local")
    ellipse = BoxPredictor(model_path, device="cpu", backend="reference", prior="ellipse")
    assert gated.prior == "gate"
    box_only = next(gated.predict_boxes(image, boxes))
    assert torch.equal(box_only.low_res_logits, next(ellipse.predict_boxes(image, boxes)).low_res_logits)
    clicked = next(gated.predict_boxes(image, boxes, **clicks))
    assert torch.equal(clicked.low_res_logits, next(plain.predict_boxes(image, boxes, **clicks)).low_res_logits)
    assert not torch.equal(clicked.low_res_logits, box_only.low_res_logits)
    prompted = next(gated.predict_boxes(image, boxes, mask_inputs=[box_only.low_res_logits], crops=[box_only.crop]))
    expected = next(plain.predict_boxes(image, boxes, mask_inputs=[box_only.low_res_logits], crops=[box_only.crop]))
    assert torch.equal(prompted.low_res_logits, expected.low_res_logits)


def test_pixel_clicks_correct_the_mask_the_annotator_saw(model_path):
    # The "pixel" update keeps the box-only mask (the gate's choice included) as its base and
    # sets each clicked native pixel to its label on top of it.
    always = PriorGate((0.0,) * 6, 50.0, (0.0,) * 6, (1.0,) * 6)
    gate_path(model_path).write_text(json.dumps(always.to_dict()))
    image = np.random.default_rng(2).integers(0, 255, (300, 400, 3), np.uint8)
    boxes = np.array([[50.0, 60.0, 130.0, 100.0]])
    gated = BoxPredictor(model_path, device="cpu", backend="reference", prior="gate")
    assert gated.click_update == "pixel"
    box_only = next(gated.predict_boxes(image, boxes))
    inside = box_only.mask.nonzero()
    outside = (~box_only.mask).nonzero()
    y0, _, x0, _ = box_only.region
    neg = [x0 + inside[1][len(inside[1]) // 2] + 0.5, y0 + inside[0][len(inside[0]) // 2] + 0.5]
    pos = [x0 + outside[1][0] + 0.5, y0 + outside[0][0] + 0.5]
    for click, label in ((pos, 1), (neg, 0)):
        clicked = next(gated.predict_boxes(image, boxes, points=[np.array([click])], point_labels=[np.array([label])]))
        assert torch.equal(clicked.low_res_logits, box_only.low_res_logits)
        cy0, _, cx0, _ = clicked.region  # the region grows to hold the click
        assert clicked.mask[int(click[1]) - cy0, int(click[0]) - cx0] == bool(label)
