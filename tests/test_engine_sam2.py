"""The box engine (BoxPredictor, ``hrmedseg segment``) on HRMedSegSAM2 and plain SAM2 models.

The engine must give SAM2ImagePredictor's logits where both preprocess alike (an image of the
model's input size), and the fine-tuning's logits on padded crops of non-square images.
"""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("sam2")

from hrmedseg.engine import BoxPredictor, Crop, logits_to_native  # noqa: E402
from hrmedseg.engine.decoder import Sam2BoxDecoder, Sam2Features, Sam2ImageEncoder  # noqa: E402
from hrmedseg.io import open_image  # noqa: E402
from hrmedseg.models.neck import HRMedSegEncoder  # noqa: E402
from hrmedseg.models.sam2 import build_hrmedseg_sam2  # noqa: E402
from hrmedseg.models.training_views import Sam2BoxPromptedSegmenter  # noqa: E402
from hrmedseg.training.finetune import (  # noqa: E402
    ENCODER_PRESETS,
    FinetuneConfig,
    _encoder_parts,
    finetune,
    save_model,
)
from test_training_data import write_disk_dataset  # noqa: E402


def _tiny_sam2():
    torch.manual_seed(0)
    model = build_hrmedseg_sam2(encoder=HRMedSegEncoder(ENCODER_PRESETS["tiny"]))
    with torch.no_grad():  # as after fine-tuning: the 1/4 and 1/8 levels carry signal (they start at zero)
        model.image_encoder.neck.proj4.weight.normal_(0, 0.1)
        model.image_encoder.neck.proj8.weight.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def sam2_bundle(tmp_path_factory):
    """A random-weight HRMedSegSAM2 saved as the fine-tuning saves it (trained at 64 px, saved at 1024)."""
    wrapper = Sam2BoxPromptedSegmenter(_tiny_sam2(), 64)
    with torch.no_grad():  # sets the prompt encoder's geometry to 64 px, as training does
        wrapper(torch.zeros(1, 3, 64, 64), [torch.tensor([[4.0, 4.0, 40.0, 40.0]])])
    path = tmp_path_factory.mktemp("w") / "hrmedseg_sam2.pt"
    save_model(wrapper, FinetuneConfig(model="hrmedseg-sam2"), path, {"source": "test"})
    return path


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory):
    """A bundle written by a real (two-step) ``--model hrmedseg-sam2`` fine-tuning run."""
    root = tmp_path_factory.mktemp("ft")
    write_disk_dataset(root / "data", images=3, disks_per_image=3)
    cfg = FinetuneConfig(model="hrmedseg-sam2", data=str(root / "data"), out=str(root / "sam2.pt"),
                         encoder_preset="tiny", img_size=64, batch_size=2, epochs=1, max_steps=2, max_boxes=3,
                         num_workers=0, device="cpu")
    return finetune(cfg).out


def _rgb(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()


def test_bundle_loads_with_sam2_steps_under_every_backend(sam2_bundle, caplog):
    import hrmedseg.engine.decoder as decoder_module

    decoder_module._logged_sam2_backends.clear()
    with caplog.at_level(logging.INFO, logger="hrmedseg.engine.decoder"):
        predictors = [BoxPredictor(str(sam2_bundle), device="cpu", backend=b) for b in ("fast", "fast", "reference")]
    for p in predictors:
        assert isinstance(p.encoder, Sam2ImageEncoder) and isinstance(p.decoder, Sam2BoxDecoder)
        assert p.backend == "reference" and p.encoder.input_size == p.model.image_size == 1024
    assert sum("no fast path" in r.getMessage() for r in caplog.records) == 1


def test_engine_equals_sam2_image_predictor_on_an_input_sized_image(sam2_bundle):
    """1024 x 1024 (the model's input size): no padding, no stretching; the engine must match exactly."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = BoxPredictor(str(sam2_bundle), device="cpu")
    image = _rgb((1024, 1024), 1)
    box = np.array([300.0, 350.0, 550.0, 630.0])  # box + context fits half the input at scale 1
    sam2 = SAM2ImagePredictor(predictor.model)
    sam2.set_image(image)
    masks, scores, theirs = sam2.predict(box=box, multimask_output=False, return_logits=True)

    features = predictor.encoder(_pixels(image))
    assert isinstance(features, Sam2Features) and len(features.high_res_feats) == 2
    logits, ours_scores = predictor.decoder(features, torch.tensor(box[None]))
    assert logits.shape == (1, 1, 256, 256)
    torch.testing.assert_close(logits[0].clamp(-32, 32), torch.from_numpy(theirs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_scores, torch.from_numpy(scores), atol=1e-4, rtol=1e-4)

    # End to end: the crop the engine plans is the whole image at scale 1, so its native mask
    # is SAM2ImagePredictor's full-resolution mask inside the object's region.
    obj = predictor.predict_box(image, box)
    assert obj.crop == Crop(1.0, 0, 0, 1024, 1024)
    y0, y1, x0, x1 = obj.region
    theirs_mask, margin = masks[0, y0:y1, x0:x1], np.abs(masks[0, y0:y1, x0:x1])
    assert 0.05 < obj.mask.mean() < 0.95, "test precondition: a non-trivial random-weight mask"
    np.testing.assert_array_equal(obj.mask[margin > 1e-3], (theirs_mask > 0)[margin > 1e-3])


def test_non_square_image_is_padded_as_in_fine_tuning(sam2_bundle):
    """On a 300 x 500 image the engine pads like training's data pipeline, not stretches like SAM2ImagePredictor."""
    from hrmedseg.training.data import CropSettings, place

    predictor = BoxPredictor(str(sam2_bundle), device="cpu")
    image = _rgb((300, 500), 2)
    box = np.array([120.0, 60.0, 330.0, 250.0])
    obj = predictor.predict_box(image, box)
    assert obj.crop == Crop(1.0, 0, 0, 1024, 1024)

    # What the fine-tuning feeds the model for this image (crop mode at scale 1: padded, not resized).
    wrapper = Sam2BoxPromptedSegmenter(predictor.model, 1024).eval()
    _, preprocessing, _ = _encoder_parts(wrapper)
    settings = CropSettings(size=1024, mode="crop", pad_value=preprocessing.pad_value)
    padded, _, valid = place(image, np.zeros((300, 500), np.int32), settings, np.random.default_rng(0))
    assert valid == (300, 500)
    with torch.no_grad():
        trained = wrapper(preprocessing.normalize(_pixels(padded)), [torch.tensor(box[None], dtype=torch.float32)])[0]

    features, _ = predictor.embedding(open_image(image), obj.crop)
    logits, _ = predictor.decoder(features, torch.tensor(box[None]))
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(obj.mask, logits_to_native(trained[0, 0], obj.crop, obj.region))
    assert 0.05 < obj.mask.mean() < 0.95, "test precondition: a non-trivial random-weight mask"


def test_segment_non_square_image_and_cache_counts_all_features(sam2_bundle):
    predictor = BoxPredictor(str(sam2_bundle), device="cpu")
    image = _rgb((300, 500), 3)
    boxes = [[10, 20, 100, 90], [200, 100, 400, 280], [30, 30, 80, 70]]
    labels, records = predictor.segment(image, boxes)
    assert labels.shape == (300, 500) and [r.id for r in records] == [1, 2, 3]
    for r in records:
        assert r.area == int((labels == r.id).sum()) and 0.0 <= r.score <= 1.0
    assert {1, 2} <= set(np.unique(labels))
    crops = len(predictor.cache)
    assert crops == predictor.encoder_calls >= 1
    features = predictor.cache.get(next(iter(predictor.cache._items)))[0]
    per_crop = sum(t.nelement() * t.element_size() for t in (features.image_embed, *features.high_res_feats))
    assert per_crop == 4 * (256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128)  # float32, 16 MiB
    assert predictor.cache.bytes == crops * per_crop
    predictor.segment(image, boxes)  # every crop comes from the cache
    assert predictor.encoder_calls == crops


def test_plain_sam2_model_matches_sam2_image_predictor():
    """SAM2 itself (Hiera encoder, no HRMedSeg parts) runs in the engine too."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    torch.manual_seed(1)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    predictor = BoxPredictor(model, device="cpu")
    image = _rgb((1024, 1024), 4)
    box = np.array([200.0, 250.0, 500.0, 480.0])
    sam2 = SAM2ImagePredictor(model)
    sam2.set_image(image)
    _, _, theirs = sam2.predict(box=box, multimask_output=False, return_logits=True)
    logits, _ = predictor.decoder(predictor.encoder(_pixels(image)), torch.tensor(box[None]))
    torch.testing.assert_close(logits[0].clamp(-32, 32), torch.from_numpy(theirs), atol=1e-3, rtol=1e-3)


def test_prompt_geometry_mismatch_is_refused():
    model = _tiny_sam2()
    model.sam_prompt_encoder.input_image_size = (64, 64)  # e.g. a model left in a training wrapper's state
    with pytest.raises(ValueError, match=r"SAM2Base.*\(64, 64\).*1024"):
        BoxPredictor(model, device="cpu")


def test_cli_segment_runs_on_a_fine_tuned_sam2_bundle(tmp_path, trained_bundle):
    from hrmedseg.cli import main

    image = tmp_path / "img.tif"
    tifffile.imwrite(image, np.random.default_rng(0).integers(0, 1000, (200, 330), dtype=np.uint16))
    boxes = tmp_path / "b.csv"
    boxes.write_text("x0,y0,x1,y1\n10,10,60,50\n150,80,260,190\n")
    out = tmp_path / "labels.tif"
    rc = main(["segment", str(image), "--boxes", str(boxes), "--out", str(out), "--model", str(trained_bundle),
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    labels = tifffile.imread(out)
    assert labels.shape == (200, 330)
    rows = list(csv.DictReader(open(tmp_path / "labels.objects.csv")))
    assert [r["id"] for r in rows] == ["1", "2"]
    for r in rows:
        assert int(r["area"]) == int((labels == int(r["id"])).sum())
    assert any(int(r["area"]) > 0 for r in rows)
    # the CLI's masks are the engine's for the same model file
    expected, _ = BoxPredictor(str(trained_bundle), device="cpu").segment(open_image(str(image)), [[10, 10, 60, 50], [150, 80, 260, 190]])
    np.testing.assert_array_equal(labels, expected)

