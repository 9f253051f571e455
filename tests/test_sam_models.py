"""HRMedSegSAM: segment-anything's Sam with our encoder, SAM decoders from real-format files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hrmedseg.errors import WeightsError
from hrmedseg.models import EncoderConfig, build_encoder, save_encoder
from hrmedseg.models.preprocessing import Preprocessing
from hrmedseg.models.sam import (
    build_hrmedseg_sam,
    extract_sam_decoder_state,
    load_hrmedseg_sam,
    sam_variant,
    save_hrmedseg_sam,
)
from hrmedseg.weights.bundle import save_bundle

SMALL = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))


def small_encoder(preprocessing: Preprocessing | None = None):
    torch.manual_seed(0)
    return build_encoder(SMALL, preprocessing).eval()


@pytest.fixture(scope="module")
def sam_vit_b_file(tmp_path_factory):
    """A plain SAM state dict in the layout of sam_vit_b_01ec64.pth (ViT-B width, one block to stay small)."""
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(1)
    sam = _build_sam(encoder_embed_dim=768, encoder_depth=1, encoder_num_heads=12, encoder_global_attn_indexes=[0])
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    torch.save(sam.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory):
    from sam2.build_sam import build_sam2

    torch.manual_seed(2)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_predictor_box_prompt_on_random_model():
    from segment_anything import SamPredictor

    model = build_hrmedseg_sam(small_encoder())
    predictor = SamPredictor(model)
    image = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    predictor.set_image(image)
    assert predictor.features.shape == (1, 256, 64, 64)
    masks, scores, low_res = predictor.predict(box=np.array([20, 10, 150, 100]), multimask_output=True)
    assert masks.shape == (3, 120, 200) and masks.dtype == bool
    assert scores.shape == (3,) and low_res.shape == (3, 256, 256)


def test_embedding_is_our_encoder_on_our_normalisation():
    """SamPredictor must feed our encoder exactly what it expects, including the release quirk."""
    from segment_anything import SamPredictor
    from segment_anything.utils.transforms import ResizeLongestSide

    encoder = small_encoder(Preprocessing.hrmedseg_release())
    model = build_hrmedseg_sam(encoder)
    assert torch.allclose(model.pixel_std.flatten(), torch.tensor(Preprocessing.hrmedseg_release().pixel_std))
    image = np.random.default_rng(1).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    predictor = SamPredictor(model)
    predictor.set_image(image)

    resized = torch.as_tensor(ResizeLongestSide(1024).apply_image(image)).permute(2, 0, 1)[None].float()
    normalised = Preprocessing.hrmedseg_release().normalize(resized)
    padded = F.pad(normalised, (0, 1024 - normalised.shape[-1], 0, 1024 - normalised.shape[-2]))
    with torch.no_grad():
        expected = encoder(padded)
    assert torch.allclose(predictor.features, expected, atol=1e-5)


def test_decoder_from_sam_checkpoint(sam_vit_b_file):
    file_state = torch.load(sam_vit_b_file, weights_only=True)
    assert sam_variant(file_state) == "vit_b"
    model = build_hrmedseg_sam(small_encoder(), decoder=sam_vit_b_file)
    own = model.state_dict()
    decoder_keys = [k for k in file_state if k.startswith(("prompt_encoder.", "mask_decoder."))]
    assert decoder_keys and all(torch.equal(own[k], file_state[k]) for k in decoder_keys)
    assert not any(k.startswith("image_encoder.blocks") for k in own)  # SAM's ViT is not carried


def test_decoder_from_bundle_and_encoder_from_path(sam_vit_b_file, tmp_path):
    decoder_state = extract_sam_decoder_state(torch.load(sam_vit_b_file, weights_only=True), str(sam_vit_b_file))
    assert all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in decoder_state)
    bundle = save_bundle(tmp_path / "sam_decoder.pt", "sam_prompt_decoder", decoder_state, config={"variant": "vit_b"})
    encoder_path = save_encoder(small_encoder(Preprocessing.hrmedseg_release()), tmp_path / "enc.pt")
    model = build_hrmedseg_sam(encoder_path, decoder=bundle)
    assert model.pixel_std.flatten().tolist() == pytest.approx(list(Preprocessing.hrmedseg_release().pixel_std))
    assert torch.equal(model.mask_decoder.iou_token.weight, decoder_state["mask_decoder.iou_token.weight"])


def test_sam2_file_as_sam_decoder_is_refused(sam2_file):
    with pytest.raises(WeightsError, match=r"sam2\.1_hiera_tiny\.pt.*SAM2.*expected a SAM checkpoint"):
        build_hrmedseg_sam(small_encoder(), decoder=sam2_file)


def test_lgvit_file_as_sam_decoder_is_refused(tmp_path):
    raw = tmp_path / "SAM_PFD_10K.pth"
    torch.save({"model": small_encoder().state_dict()}, raw)
    with pytest.raises(WeightsError, match=r"SAM_PFD_10K\.pth.*LGViT.*encoder"):
        build_hrmedseg_sam(small_encoder(), decoder=raw)
    bundle = save_encoder(small_encoder(), tmp_path / "encoder_bundle.pt")
    with pytest.raises(WeightsError, match=r"encoder_bundle\.pt.*'lgvit_neck'.*expected a SAM decoder"):
        build_hrmedseg_sam(small_encoder(), decoder=bundle)


def test_decoder_with_wrong_shapes_is_refused(sam_vit_b_file, tmp_path):
    state = torch.load(sam_vit_b_file, weights_only=True)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    bad = tmp_path / "bad_sam.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match=r"bad_sam\.pth.*iou_token"):
        build_hrmedseg_sam(small_encoder(), decoder=bad)


def test_save_and_load_round_trip(sam_vit_b_file, tmp_path):
    from segment_anything import SamPredictor

    model = build_hrmedseg_sam(small_encoder(Preprocessing.hrmedseg_release()), decoder=sam_vit_b_file)
    path = save_hrmedseg_sam(model, tmp_path / "hrmedseg_sam.pt", provenance={"note": "test"})
    loaded = load_hrmedseg_sam(path)
    assert loaded.image_encoder.config == SMALL
    assert torch.equal(loaded.pixel_std, model.pixel_std)
    image = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    outputs = []
    for m in (model, loaded):
        predictor = SamPredictor(m)
        predictor.set_image(image)
        outputs.append(predictor.predict(box=np.array([4, 4, 40, 50]), return_logits=True)[0])
    assert np.allclose(outputs[0], outputs[1], atol=1e-5)
