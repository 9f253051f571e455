"""Prompt-free HRMedSeg inference: geometry as in training, tiling, fit, labels, CLI."""

from __future__ import annotations

import csv
import threading

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hrmedseg.cli import main
from hrmedseg.engine.semantic import (
    Cancelled,
    InputGeometry,
    SemanticPredictor,
    resample_weights,
    tile_starts,
)
from hrmedseg.errors import InputError, WeightsError
from hrmedseg.models.hrmedseg_model import build_hrmedseg, save_hrmedseg
from hrmedseg.models.neck import EncoderConfig
from hrmedseg.models.preprocessing import Preprocessing

SMALL = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6), img_size=64)


def _bundle(path, num_classes, provenance, class_names=None):
    torch.manual_seed(0)
    model = build_hrmedseg(num_classes, SMALL, class_names=class_names).eval()
    return save_hrmedseg(model, path, provenance=provenance)


@pytest.fixture(scope="module")
def crop_file(tmp_path_factory):
    prov = {"input_mode": "crop", "scale": 2.0, "img_size": 64, "classes": None}
    return _bundle(tmp_path_factory.mktemp("w") / "nuclei.pt", 1, prov)


@pytest.fixture(scope="module")
def fit_file(tmp_path_factory):
    prov = {"input_mode": "fit", "scale": 1.0, "img_size": 64, "classes": "disc:>=1,cup:2"}
    return _bundle(tmp_path_factory.mktemp("w") / "fundus.pt", 2, prov)


class Spy:
    """Records a module's inputs and outputs."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        module.register_forward_hook(self._record)

    def _record(self, _module, args, out) -> None:  # returning None keeps the module's output
        self.inputs.append(args[0].clone())
        self.outputs.append(out.clone())


class Pointwise(nn.Module):
    """An HRMedSeg-like model whose logits depend on each pixel alone (a 1x1 conv)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, img_size: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, weight.shape[0], 1)
        with torch.no_grad():
            self.conv.weight.copy_(weight.view(weight.shape[0], 3, 1, 1))
            self.conv.bias.copy_(bias)
        self.num_classes = weight.shape[0]
        self.preprocessing = Preprocessing.sam()
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def grey_threshold_model(fractions: list[float]) -> Pointwise:
    """Class c's logit is grey / 255 - fractions[c] (SAM normalisation undone by the 1x1 conv)."""
    std, mean = torch.tensor(Preprocessing.sam().pixel_std), torch.tensor(Preprocessing.sam().pixel_mean)
    weight = (std / 255.0 / 3.0).repeat(len(fractions), 1)
    bias = float(mean.sum()) / 255.0 / 3.0 - torch.tensor(fractions)
    return Pointwise(weight, bias)


def test_resample_weights_match_pil_and_windows_agree():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    t = torch.tensor(a, dtype=torch.float32)
    for oh, ow in [(74, 106), (20, 27), (13, 100)]:
        ref = np.asarray(Image.fromarray(a).resize((ow, oh), Image.BILINEAR)).astype(np.float32)
        _, _, wy = resample_weights(37, oh, 0, oh)
        _, _, wx = resample_weights(53, ow, 0, ow)
        full = wy @ a.astype(np.float32) @ wx.T
        assert np.abs(np.round(full) - ref).max() <= 1  # PIL computes 8-bit in fixed point
        y0, y1, wy2 = resample_weights(37, oh, 3, oh - 2)
        x0, x1, wx2 = resample_weights(53, ow, 5, ow - 1)
        window = wy2 @ t[y0:y1, x0:x1].numpy() @ wx2.T
        np.testing.assert_allclose(window, full[3 : oh - 2, 5 : ow - 1], atol=1e-4)


def test_geometry_from_provenance_and_bad_values():
    g = InputGeometry.from_provenance({"input_mode": "crop", "scale": 2, "img_size": 128}, 1024)
    assert (g.mode, g.img_size, g.scale, g.tile_overlap) == ("crop", 128, 2.0, 32)
    assert InputGeometry.from_provenance({}, 256) == InputGeometry("crop", 256, 1.0)
    assert InputGeometry.from_provenance({"input_mode": "fit", "scale": 3, "img_size": 64}, 1).scale == 1.0
    with pytest.raises(WeightsError, match="m.pt.*input mode 'zoom'"):
        InputGeometry.from_provenance({"input_mode": "zoom"}, 64, "m.pt")
    with pytest.raises(WeightsError, match="img_size 100"):
        InputGeometry.from_provenance({"input_mode": "crop", "img_size": 100}, 64, "m.pt")
    with pytest.raises(InputError, match="overlap 40"):
        InputGeometry("crop", 64, 1.0, overlap=40)
    assert tile_starts(50, 64, 16) == [0]
    assert tile_starts(150, 64, 16) == [0, 48, 86]


def test_crop_single_tile_equals_single_pass_with_rescale(crop_file):
    """30 x 25 at scale 2 is one 64 tile: the model sees the x2 image padded with the pixel mean."""
    predictor = SemanticPredictor(crop_file, device="cpu")
    assert predictor.geometry == InputGeometry("crop", 64, 2.0)
    spy = Spy(predictor.model)
    rng = np.random.default_rng(1)
    image = (rng.integers(0, 64, (30, 25, 3)) * 4).astype(np.uint8)  # multiples of 4: x2 bilinear stays integral
    logits = predictor.predict_logits(image)
    assert logits.shape == (1, 30, 25) and logits.dtype == np.float32
    assert len(spy.inputs) == 1 and spy.inputs[0].shape == (1, 3, 64, 64)

    model = predictor.model
    big = F.interpolate(torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None], size=(60, 50), mode="bilinear", align_corners=False)
    x = torch.tensor([124.0, 116.0, 104.0]).view(1, 3, 1, 1).repeat(1, 1, 64, 64)
    x[:, :, :60, :50] = big.round()
    x = model.preprocessing.normalize(x)
    torch.testing.assert_close(spy.inputs[0], x, atol=1e-5, rtol=0)
    with torch.inference_mode():
        ref = model(x)[:, :, :60, :50]
    ref = F.interpolate(ref, size=(30, 25), mode="bilinear", align_corners=False, antialias=True)[0]
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)

    labels = predictor.segment(image)
    assert labels.shape == (30, 25) and labels.dtype == np.int32


def test_crop_tiles_assemble_like_whole_image_prediction():
    """A per-pixel model makes tiling exact: any tile layout must give the whole-image result."""
    torch.manual_seed(0)
    model = Pointwise(torch.randn(2, 3), torch.randn(2))
    predictor = SemanticPredictor(model, device="cpu", geometry=InputGeometry("crop", 64, 1.5, overlap=16))
    spy = Spy(model)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (70, 95), dtype=np.uint8)
    calls = []
    logits = predictor.predict_logits(image, progress=lambda done, total: calls.append((done, total)))
    hs, ws = 105, 142  # round(70 * 1.5), round(95 * 1.5)
    n_tiles = len(tile_starts(hs, 64, 16)) * len(tile_starts(ws, 64, 16))
    assert n_tiles > 4 and len(spy.inputs) == n_tiles and calls[-1] == (n_tiles, n_tiles)
    assert all(x.shape == (1, 3, 64, 64) for x in spy.inputs)

    _, _, wy = resample_weights(70, hs, 0, hs)
    _, _, wx = resample_weights(95, ws, 0, ws)
    big = np.clip(np.round(wy @ image.astype(np.float32) @ wx.T), 0, 255)
    x = model.preprocessing.normalize(torch.tensor(big, dtype=torch.float32).expand(1, 3, hs, ws))
    with torch.inference_mode():
        scaled = model(x)[0].numpy()
    _, _, by = resample_weights(hs, 70, 0, 70)
    _, _, bx = resample_weights(ws, 95, 0, 95)
    expected = np.stack([by @ c @ bx.T for c in scaled])
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_fit_resizes_whole_image_and_returns_native_size(fit_file):
    predictor = SemanticPredictor(fit_file, device="cpu")
    assert predictor.geometry.mode == "fit" and predictor.class_names == ["disc", "cup"]
    spy = Spy(predictor.model)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)
    logits = predictor.predict_logits(image)
    assert logits.shape == (2, 100, 80)
    assert len(spy.inputs) == 1 and spy.inputs[0].shape == (1, 3, 64, 64)
    fitted = np.asarray(Image.fromarray(image).resize((51, 64), Image.BILINEAR)).astype(np.float32)  # long side 64
    seen = spy.inputs[0][0] * torch.tensor(Preprocessing.sam().pixel_std).view(3, 1, 1) + torch.tensor(Preprocessing.sam().pixel_mean).view(3, 1, 1)
    assert np.abs(seen[:, :64, :51].permute(1, 2, 0).numpy() - fitted).max() < 1.01
    np.testing.assert_allclose(seen[:, :, 51:].numpy(), np.broadcast_to(np.array([124.0, 116, 104]).reshape(3, 1, 1), (3, 64, 13)), atol=1e-3)
    up = F.interpolate(spy.outputs[0][:, :, :64, :51], size=(100, 80), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(logits, up.numpy(), atol=1e-4)
    labels = predictor.segment(image)
    assert labels.shape == (100, 80) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}


def test_nested_classes_later_overwrite_and_instances_are_components():
    image = np.zeros((80, 80), np.uint8)
    image[10:70, 10:70] = 120  # disc
    image[30:50, 30:50] = 250  # cup inside the disc
    model = grey_threshold_model([0.3, 0.7])  # disc: grey > 0.3 * 255, cup: grey > 0.7 * 255
    classes = SemanticPredictor(model, device="cpu", geometry=InputGeometry("fit", 64)).segment(image)
    assert classes.dtype == np.uint8
    assert classes[5, 5] == 0 and classes[20, 20] == 1 and classes[40, 40] == 2
    assert abs(int((classes == 2).sum()) - 400) < 60 and abs(int((classes >= 1).sum()) - 3600) < 250

    blobs = np.zeros((90, 90), np.uint8)
    blobs[5:20, 5:25] = 200
    blobs[50:80, 40:60] = 200
    one = grey_threshold_model([0.3])
    predictor = SemanticPredictor(one, device="cpu", geometry=InputGeometry("crop", 64, 1.0, overlap=16))
    labels = predictor.segment(blobs)
    assert labels.dtype == np.int32 and labels.max() == 2
    assert labels[10, 10] == 1 and labels[60, 50] == 2 and labels[40, 40] == 0
    rows = predictor.table(labels)
    assert [r["id"] for r in rows] == [1, 2] and rows[1]["area"] == int((labels == 2).sum())
    assert predictor.segment(blobs, threshold=0.999).max() == 0


def test_uint16_is_scaled_min_max_like_training(crop_file):
    from hrmedseg.training.data import to_rgb_uint8

    predictor = SemanticPredictor(crop_file, device="cpu")
    rng = np.random.default_rng(4)
    img16 = rng.integers(300, 4000, (20, 24)).astype(np.uint16)
    as_trained = to_rgb_uint8(img16)
    np.testing.assert_allclose(predictor.predict_logits(img16), predictor.predict_logits(as_trained), atol=1e-4)


def test_lazy_tiff_progress_and_cancel(tmp_path, crop_file):
    path = tmp_path / "img.tif"
    rng = np.random.default_rng(5)
    tifffile.imwrite(path, rng.integers(0, 256, (40, 44), dtype=np.uint8), tile=(16, 16))
    predictor = SemanticPredictor(crop_file, device="cpu")
    calls = []
    labels = predictor.segment(path, progress=lambda d, t: calls.append((d, t)))
    assert labels.shape == (40, 44) and calls == [(i, 4) for i in range(1, 5)]  # 80 x 88 -> 2 x 2 tiles
    event = threading.Event()
    event.set()
    before = predictor.model_calls
    with pytest.raises(Cancelled):
        predictor.segment(path, cancel=event)
    assert predictor.model_calls == before


def test_bad_inputs(tmp_path, crop_file):
    from hrmedseg.models.sam import build_hrmedseg_sam, save_hrmedseg_sam
    from hrmedseg.models.neck import HRMedSegEncoder

    with pytest.raises(WeightsError, match="nothing.pt"):
        SemanticPredictor(tmp_path / "nothing.pt", device="cpu")
    box_model = save_hrmedseg_sam(build_hrmedseg_sam(HRMedSegEncoder(SMALL)), tmp_path / "box.pt")
    with pytest.raises(WeightsError, match="box.pt holds a 'hrmedseg_sam' model, not a prompt-free"):
        SemanticPredictor(box_model, device="cpu")
    with pytest.raises(InputError, match="no num_classes"):
        SemanticPredictor(nn.Conv2d(3, 1, 1), device="cpu")
    predictor = SemanticPredictor(crop_file, device="cpu")
    with pytest.raises(InputError, match="threshold 1.5"):
        predictor.segment(np.zeros((8, 8), np.uint8), threshold=1.5)
    with pytest.raises(InputError, match="5 dimensions"):
        predictor.segment(np.zeros((2, 2, 8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="image file not found"):
        predictor.segment(tmp_path / "missing.png")
    with pytest.raises(InputError, match="tile overlap 2 is too small"):
        SemanticPredictor(crop_file, device="cpu", tile_overlap=2).segment(np.zeros((50, 50), np.uint8))


def test_cli_prompt_free_writes_labels_and_tables(tmp_path, crop_file, fit_file, capsys):
    rng = np.random.default_rng(6)
    png = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(png)
    out = tmp_path / "out" / "labels.tif"
    assert main(["segment", str(png), "--out", str(out), "--model", str(crop_file), "--device", "cpu", "--no-progress"]) == 0
    labels = tifffile.imread(out)
    assert labels.shape == (40, 50) and labels.dtype == np.uint16
    rows = list(csv.DictReader(open(tmp_path / "out" / "labels.objects.csv")))
    assert [int(r["id"]) for r in rows] == sorted(set(np.unique(labels)) - {0})
    for r in rows:
        assert int(r["area"]) == int((labels == int(r["id"])).sum())
    assert "wrote" in capsys.readouterr().out

    out2 = tmp_path / "classes.tif"
    assert main(["segment", str(png), "--out", str(out2), "--model", str(fit_file), "--device", "cpu", "--no-progress"]) == 0
    classes = tifffile.imread(out2)
    rows = list(csv.DictReader(open(tmp_path / "classes.objects.csv")))
    assert [(r["class"], r["name"]) for r in rows] == [("1", "disc"), ("2", "cup")]
    assert [int(r["area"]) for r in rows] == [int((classes == 1).sum()), int((classes == 2).sum())]


def test_cli_without_boxes_needs_a_prompt_free_model(tmp_path, capsys):
    from hrmedseg.models.sam import build_hrmedseg_sam, save_hrmedseg_sam
    from hrmedseg.models.neck import HRMedSegEncoder

    box_model = save_hrmedseg_sam(build_hrmedseg_sam(HRMedSegEncoder(SMALL)), tmp_path / "box.pt")
    png = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(png)
    out = tmp_path / "labels.tif"
    out.write_bytes(b"previous")
    assert main(["segment", str(png), "--out", str(out), "--model", str(box_model), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--boxes is required" in err and "box.pt" in err and "Traceback" not in err
    assert out.read_bytes() == b"previous"


def test_label_blocks_within_windows_split_the_model_calls():
    from hrmedseg.batch.tasks import plan_tiles
    from hrmedseg.engine.semantic import assemble_labels

    torch.manual_seed(0)
    model = build_hrmedseg(1, EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6), img_size=64)).eval()
    predictor = SemanticPredictor(model, device="cpu", geometry=InputGeometry("crop", 64, 1.0))
    image = np.random.default_rng(0).integers(0, 255, (150, 200), dtype=np.uint8)
    whole = predictor.segment(image)
    calls = predictor.model_calls
    blocks = [b for window in plan_tiles(image.shape, 70) for b in predictor.label_blocks(image, within=window)]
    assert predictor.model_calls == 2 * calls  # each model call made by exactly one window
    np.testing.assert_array_equal(assemble_labels(image.shape, 1, blocks), whole)
