"""One pixel pipeline: the training loader and the engine give a model the same input.

uint16 images with two and three channels, each channel over its own range (a global min..max
would dim the narrow channels), go through ``SegmentationCrops`` (what fine-tuning feeds the
model) and through ``SemanticPredictor`` (the prompt-free engine, its default intensity); the
normalised (1, 3, S, S) model inputs must be equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from hrmedseg.engine.intensity import DEFAULT_INTENSITY, compute_scaling
from hrmedseg.engine.semantic import InputGeometry, SemanticPredictor
from hrmedseg.io.readers import open_image
from hrmedseg.models.preprocessing import Preprocessing
from hrmedseg.training.data import CropSettings, SegmentationCrops, discover_samples

SIZE = 64
SHAPE = (40, 50)


class InputRecorder(nn.Module):
    """An HRMedSeg-like model that keeps every input it is given and predicts zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 1
        self.preprocessing = Preprocessing.sam()
        self.img_size = SIZE
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return x.new_zeros((x.shape[0], 1, *x.shape[-2:]))


def uint16_channels(n: int) -> np.ndarray:
    """(H, W, n) uint16, channel c uniform over its own range [1000 c, 1000 c + 400 + 20000 c]."""
    rng = np.random.default_rng(n)
    return np.stack([rng.integers(1000 * c, 1000 * c + 400 + 20000 * c, SHAPE) for c in range(n)], -1).astype(np.uint16)


def write_sample(root, pixels: np.ndarray, **tiff_options):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    tifffile.imwrite(root / "images" / "a.tif", pixels, **tiff_options)
    labels = np.zeros(SHAPE, np.uint8)
    labels[10:20, 10:30] = 1
    Image.fromarray(labels).save(root / "masks" / "a.png")
    return root / "images" / "a.tif"


CASES = {
    "2 channels, interleaved": (2, lambda a: a, dict(photometric="minisblack", planarconfig="contig"), [0, 1]),
    "2 channels, channels first": (2, lambda a: np.moveaxis(a, -1, 0), dict(metadata={"axes": "CYX"}), [0, 1]),
    "3 channels, RGB": (3, lambda a: a, dict(photometric="rgb"), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_loader_and_engine_give_the_same_model_input(tmp_path, case):
    n, layout, tiff_options, engine_channels = CASES[case]
    pixels = uint16_channels(n)
    path = write_sample(tmp_path, layout(pixels), **tiff_options)

    model = InputRecorder()
    crop = CropSettings(size=SIZE, mode="crop", pad_value=model.preprocessing.pad_value)
    item = SegmentationCrops(discover_samples(tmp_path).samples, "semantic", crop, train=False)[0]
    trained_on = model.preprocessing.normalize(item["image"][None].float())

    predictor = SemanticPredictor(model, device="cpu", geometry=InputGeometry("crop", SIZE, 1.0))
    predictor.predict_logits(open_image(path, channel=engine_channels))
    assert len(model.inputs) == 1
    torch.testing.assert_close(model.inputs[0], trained_on, rtol=0, atol=0)

    # The rule itself: each channel min..max -> 0..255 (a global range would not reach 255 in
    # the narrow ones); a second channel is green, blue stays 0.
    rgb = item["image"][:, : SHAPE[0], : SHAPE[1]].permute(1, 2, 0).numpy()
    for c in range(n):
        assert rgb[..., c].min() == 0 and rgb[..., c].max() == 255
    if n == 2:
        assert not rgb[..., 2].any()
    scaling = compute_scaling(open_image(path, channel=engine_channels), DEFAULT_INTENSITY)
    np.testing.assert_array_equal(np.round(scaling.apply(pixels)).astype(np.uint8), rgb)


def test_grey_plus_alpha_png_stays_grey_not_red_and_green(tmp_path):
    """Two channels are red and green, but a grey + alpha PNG is grey (the readers drop its alpha)."""
    from hrmedseg.training.data import read_image

    grey = (np.arange(SHAPE[0] * SHAPE[1]) % 256).astype(np.uint8).reshape(SHAPE)
    Image.fromarray(np.dstack([grey, np.full_like(grey, 9)]), "LA").save(tmp_path / "la.png")
    rgb = read_image(tmp_path / "la.png")
    assert all(np.array_equal(rgb[..., c], grey) for c in range(3))
    engine = open_image(tmp_path / "la.png")
    assert engine.n_channels == 1 and np.array_equal(engine.read(0, SHAPE[0], 0, SHAPE[1])[..., 0], grey)


@pytest.mark.parametrize("case", list(CASES))
def test_training_loader_and_box_engine_scale_pixels_alike(tmp_path, case):
    """The box engine's default scaling of an image is the one training applied to it."""
    from hrmedseg.engine import BoxPredictor
    from hrmedseg.models import build_hrmedseg_sam

    n, layout, tiff_options, engine_channels = CASES[case]
    pixels = uint16_channels(n)
    path = write_sample(tmp_path, layout(pixels), **tiff_options)
    crop = CropSettings(size=SIZE, mode="crop", pad_value=(0, 0, 0))
    trained_rgb = SegmentationCrops(discover_samples(tmp_path).samples, "semantic", crop, train=False)[0]["image"]

    predictor = BoxPredictor(build_hrmedseg_sam(), device="cpu", backend="reference")
    scaling = predictor.scaling(open_image(path, channel=engine_channels))
    engine_rgb = np.round(scaling.apply(pixels)).astype(np.uint8)
    np.testing.assert_array_equal(engine_rgb, trained_rgb[:, : SHAPE[0], : SHAPE[1]].permute(1, 2, 0).numpy())
