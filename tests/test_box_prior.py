"""The inscribed-ellipse box prior: its geometry, its place in bundles, the engine and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import ellipse

from hrmedseg.engine import BoxPredictor
from hrmedseg.models import load_model_with_metadata, save_hrmedseg_sam
from hrmedseg.models.box_prior import add_box_prior, ellipse_prior_logits
from test_engine_predictor import tiny_sam


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_prior_is_positive_exactly_inside_the_inscribed_ellipse():
    box = torch.tensor([[100.0, 200.0, 300.0, 260.0]])
    logits = ellipse_prior_logits(box, (256, 256), (1024, 1024))
    assert logits.shape == (1, 1, 256, 256)
    inside = (logits[0, 0] > 0).numpy()
    # Cell (i, j) has its centre at input pixel ((i + 0.5) * 4, (j + 0.5) * 4).
    expected = np.zeros((256, 256), bool)
    rr, cc = ellipse(230 / 4 - 0.5, 200 / 4 - 0.5, 30 / 4, 100 / 4, shape=(256, 256))
    expected[rr, cc] = True
    assert dice(inside, expected) > 0.97
    assert logits.max() <= 4.0 and logits.min() >= -8.0


def test_unknown_prior_refused_and_none_is_identity():
    logits = torch.randn(2, 1, 8, 8)
    boxes = torch.tensor([[0.0, 0, 16, 16], [4, 4, 20, 30]])
    assert torch.equal(add_box_prior(logits, boxes, (32, 32), "none"), logits)
    with pytest.raises(ValueError, match="unknown box prior"):
        add_box_prior(logits, boxes, (32, 32), "circle")


@pytest.fixture(scope="module")
def prior_model_path(tmp_path_factory):
    model = tiny_sam(seed=3)
    # A decoder whose mask logits are 0 everywhere: what the engine shows is the prior alone.
    last = model.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    for mlp in model.mask_decoder.output_hypernetworks_mlps:
        torch.nn.init.zeros_(mlp.layers[-1].weight)
        torch.nn.init.zeros_(mlp.layers[-1].bias)
    assert last.weight.abs().sum() == 0
    return save_hrmedseg_sam(model, tmp_path_factory.mktemp("w") / "prior.pt", box_prior="ellipse")


def test_bundle_keeps_the_prior(prior_model_path):
    assert load_model_with_metadata(prior_model_path).metadata.box_prior == "ellipse"


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_engine_adds_the_prior_at_native_resolution(prior_model_path, backend):
    predictor = BoxPredictor(prior_model_path, device="cpu", backend=backend)
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)
    box = np.array([50.0, 60.0, 130.0, 100.0])
    obj = predictor.predict_box(image, box)
    y0, y1, x0, x1 = obj.region
    full = np.zeros(image.shape[:2], bool)
    full[y0:y1, x0:x1] = obj.mask
    expected = np.zeros(image.shape[:2], bool)
    rr, cc = ellipse(79.5, 89.5, 20, 40, shape=image.shape[:2])
    expected[rr, cc] = True
    assert dice(full, expected) > 0.95


def test_training_forward_adds_the_prior():
    from hrmedseg.models.training_views import BoxPromptedSegmenter

    model = tiny_sam(seed=1)
    wrapped = BoxPromptedSegmenter(model, 256)
    images = torch.randn(1, 3, 256, 256)
    boxes = [torch.tensor([[20.0, 30.0, 120.0, 90.0]])]
    with torch.no_grad():
        plain = wrapped(images, boxes)[0]
        wrapped.box_prior = "ellipse"
        with_prior = wrapped(images, boxes)[0]
    expected = ellipse_prior_logits(boxes[0], plain.shape[-2:], (256, 256))
    assert torch.allclose(with_prior - plain, expected, atol=1e-5)


def _ellipse_and_box():
    box = torch.tensor([[40.0, 60.0, 200.0, 160.0]])
    return box, ellipse_prior_logits(box, (64, 64), (256, 256))


def test_prior_rule_auto_takes_the_ellipse_only_within_the_models_own_error():
    from hrmedseg.models.box_prior import apply_prior_rule

    box, ellipse = _ellipse_and_box()
    # The model's mask: the ellipse shifted by 2 cells (IoU with the ellipse about 0.85).
    shifted = torch.roll(ellipse, shifts=2, dims=-1)
    iou = ((shifted > 0) & (ellipse > 0)).sum() / ((shifted > 0) | (ellipse > 0)).sum()
    assert 0.7 < iou < 0.95
    unsure = apply_prior_rule(shifted, torch.tensor([float(iou) - 0.05]), box, (256, 256), "auto")
    sure = apply_prior_rule(shifted, torch.tensor([float(iou) + 0.05]), box, (256, 256), "auto")
    assert torch.equal(unsure, ellipse)  # the model predicts more error than its distance to the ellipse
    assert torch.equal(sure, shifted)  # the model is surer of its mask than of the ellipse: keep it
    assert torch.equal(apply_prior_rule(shifted, torch.tensor([1.0]), box, (256, 256), "model"), shifted)
    assert torch.equal(apply_prior_rule(shifted, torch.tensor([1.0]), box, (256, 256), "ellipse"), ellipse)
    with pytest.raises(ValueError, match="unknown prior rule"):
        apply_prior_rule(shifted, torch.tensor([1.0]), box, (256, 256), "blend")


def test_prior_rule_auto_is_per_object():
    from hrmedseg.models.box_prior import apply_prior_rule

    box, ellipse = _ellipse_and_box()
    boxes = box.repeat(2, 1)
    # Garbage masks (random logits, IoU with the ellipse well below 0.5): object 0 scored low, object 1 high.
    garbage = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 5
    out = apply_prior_rule(garbage, torch.tensor([0.05, 0.99]), boxes, (256, 256), "auto")
    assert torch.equal(out[0], ellipse[0]) and torch.equal(out[1], garbage[1])


def test_engine_prior_option(prior_model_path):
    image = np.random.default_rng(1).integers(0, 255, (300, 400, 3), np.uint8)
    box = np.array([50.0, 60.0, 130.0, 100.0])
    from hrmedseg.errors import InputError

    with pytest.raises(InputError, match="unknown prior"):
        BoxPredictor(prior_model_path, device="cpu", prior="circle")
    # A random model without a prior: "ellipse" gives what the zero decoder + ellipse prior gives.
    ellipse_only = BoxPredictor(tiny_sam(seed=5), device="cpu", backend="reference", prior="ellipse").predict_box(image, box)
    prior_alone = BoxPredictor(prior_model_path, device="cpu", backend="reference").predict_box(image, box)
    assert ellipse_only.region == prior_alone.region
    assert np.array_equal(ellipse_only.mask, prior_alone.mask)
    # "auto" returns either the model's mask or that ellipse, never anything else.
    model = tiny_sam(seed=5)
    plain = BoxPredictor(model, device="cpu", backend="reference").predict_box(image, box)
    auto = BoxPredictor(model, device="cpu", backend="reference", prior="auto").predict_box(image, box)
    assert np.array_equal(auto.mask, plain.mask) or np.array_equal(auto.mask, prior_alone.mask)


def test_cli_prior_flag_reaches_the_engine(prior_model_path):
    from hrmedseg.cli import build_parser
    from hrmedseg.cli.segment import load_predictor

    argv = ["segment", "img.png", "--out", "l.tif", "--model", str(prior_model_path), "--device", "cpu", "--no-disk-cache"]
    assert load_predictor(build_parser().parse_args(argv)).prior == "model"
    assert load_predictor(build_parser().parse_args([*argv, "--prior", "auto"])).prior == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--prior", "circle"])
