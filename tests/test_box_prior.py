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
