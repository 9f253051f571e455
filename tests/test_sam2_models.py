"""HRMedSegSAM2: SAM2Base with our encoder + Sam2Neck; SAM2 decoders from real-format files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrmedseg.errors import WeightsError
from hrmedseg.models import EncoderConfig, build_encoder, save_encoder
from hrmedseg.models.preprocessing import Preprocessing
from hrmedseg.models.sam2 import (
    SAM2_PREDICTOR_PREPROCESSING,
    HRMedSegSam2ImageEncoder,
    build_hrmedseg_sam2,
    build_hrmedseg_sam2_with_metadata,
    extract_sam2_decoder_state,
    hrmedseg_sam2_from_checkpoint,
    load_hrmedseg_sam2,
    save_hrmedseg_sam2,
)
from hrmedseg.weights.bundle import save_bundle
from hrmedseg.weights.checkpoint import read_checkpoint

SMALL = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))


def small_encoder(preprocessing: Preprocessing | None = None):
    torch.manual_seed(0)
    return build_encoder(SMALL, preprocessing).eval()


def _sam2_file(tmp_path_factory, config: str, name: str):
    from sam2.build_sam import build_sam2

    torch.manual_seed(3)
    model = build_sam2(config, ckpt_path=None, device="cpu")
    path = tmp_path_factory.mktemp("sam2") / name
    torch.save({"model": model.state_dict()}, path)  # the layout of the released files
    return path


@pytest.fixture(scope="module")
def sam21_tiny_file(tmp_path_factory):
    return _sam2_file(tmp_path_factory, "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt")


@pytest.fixture(scope="module")
def sam21_tiny_state(sam21_tiny_file):
    return torch.load(sam21_tiny_file, weights_only=True)["model"]


def test_extract_keeps_the_image_path_and_detects_config(sam21_tiny_state):
    state, config = extract_sam2_decoder_state({"model": sam21_tiny_state}, "sam2.1_hiera_tiny.pt")
    assert config == {"sam2_config": "sam2.1_hiera_t", "memory": False}
    assert {"no_mem_embed", "no_mem_pos_enc"} <= set(state)
    assert any(k.startswith("sam_mask_decoder.conv_s0.") for k in state)
    assert any(k.startswith("sam_prompt_encoder.") for k in state)
    assert not any(k.startswith(("image_encoder.", "memory_attention.", "memory_encoder.")) for k in state)
    assert all(torch.equal(v, sam21_tiny_state[k]) for k, v in state.items())

    with_memory, config = extract_sam2_decoder_state(sam21_tiny_state, "x", include_memory=True)
    assert config["memory"] is True
    assert set(with_memory) == {k for k in sam21_tiny_state if not k.startswith("image_encoder.")}


def test_config_detection_sam2_and_sizes(tmp_path_factory):
    path = _sam2_file(tmp_path_factory, "configs/sam2/sam2_hiera_s.yaml", "sam2_hiera_small.pt")
    _, config = extract_sam2_decoder_state(torch.load(path, weights_only=True), str(path))
    assert config["sam2_config"] == "sam2_hiera_s"


def test_decoder_loaded_from_sam2_file(sam21_tiny_file, sam21_tiny_state):
    model, metadata = build_hrmedseg_sam2_with_metadata(small_encoder(), decoder=sam21_tiny_file)
    own = model.state_dict()
    non_encoder = [k for k in sam21_tiny_state if not k.startswith("image_encoder.")]
    assert all(torch.equal(own[k], sam21_tiny_state[k]) for k in non_encoder)
    assert metadata.sam2.sam2_config == "sam2.1_hiera_t" and metadata.sam2.memory
    assert not any(k.startswith("image_encoder.trunk.blocks") for k in own)  # Hiera is not carried


def test_image_predictor_box_prompt(sam21_tiny_file):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = build_hrmedseg_sam2(small_encoder(), decoder=sam21_tiny_file)
    predictor = SAM2ImagePredictor(model)
    image = np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    predictor.set_image(image)
    assert predictor._features["image_embed"].shape == (1, 256, 64, 64)
    assert [f.shape[-1] for f in predictor._features["high_res_feats"]] == [256, 128]
    masks, scores, low_res = predictor.predict(box=np.array([10, 5, 120, 80]), multimask_output=True)
    assert masks.shape == (3, 90, 140)
    assert scores.shape == (3,) and low_res.shape == (3, 256, 256)


def test_pyramid_shapes_positions_and_zero_started_fine_levels():
    image_encoder = HRMedSegSam2ImageEncoder(small_encoder())
    with torch.no_grad():
        out = image_encoder(torch.randn(2, 3, 64, 96))
    sizes = [tuple(f.shape) for f in out["backbone_fpn"]]
    assert sizes == [(2, 256, 16, 24), (2, 256, 8, 12), (2, 256, 4, 6)]
    assert [tuple(p.shape) for p in out["vision_pos_enc"]] == sizes
    assert out["vision_features"] is out["backbone_fpn"][-1]
    # Untrained fine levels carry nothing (zero-initialised projections), the 1/16 level does.
    assert torch.count_nonzero(out["backbone_fpn"][0]) == 0 and torch.count_nonzero(out["backbone_fpn"][1]) == 0
    assert out["backbone_fpn"][2].abs().sum() > 0
    # The 1/16 level is the HRMedSeg encoder itself, recoverable for SAM or training use.
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(image_encoder.hrmedseg_encoder()(x), image_encoder(x)["vision_features"])


@pytest.mark.parametrize("preprocessing", [Preprocessing.hrmedseg_release(), Preprocessing.sam()])
def test_predictor_normalisation_is_turned_into_the_encoders(preprocessing):
    """SAM2's transforms normalise with ImageNet statistics; the encoder must see its own."""
    encoder = small_encoder(preprocessing)
    image_encoder = HRMedSegSam2ImageEncoder(encoder)
    assert image_encoder.renormalise == (preprocessing != Preprocessing.sam())
    pixels = torch.randint(0, 256, (1, 3, 64, 64)).float()
    as_sam2_feeds_it = SAM2_PREDICTOR_PREPROCESSING.normalize(pixels)
    with torch.no_grad():
        got = image_encoder(as_sam2_feeds_it)["vision_features"]
        expected = encoder(preprocessing.normalize(pixels))
    assert torch.allclose(got, expected, atol=1e-4)


def test_decoder_from_compact_bundle(sam21_tiny_state, tmp_path):
    state, config = extract_sam2_decoder_state(sam21_tiny_state, "sam2.1_hiera_tiny.pt")
    bundle = save_bundle(tmp_path / "sam2_decoder.pt", "sam2_prompt_decoder", state, config=config)
    encoder_path = save_encoder(small_encoder(Preprocessing.hrmedseg_release()), tmp_path / "enc.pt")
    model, metadata = build_hrmedseg_sam2_with_metadata(encoder_path, decoder=bundle)
    assert model.image_encoder.renormalise
    assert metadata.sam2.to_dict() == {"sam2_config": "sam2.1_hiera_t", "memory": False, "neck": model.image_encoder.neck.config.to_dict()}
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_sam_v1_and_lgvit_files_are_refused(tmp_path):
    from hrmedseg.models.sam import build_sam_prompt_decoder

    prompt_encoder, mask_decoder = build_sam_prompt_decoder()
    sam_v1 = {f"prompt_encoder.{k}": v for k, v in prompt_encoder.state_dict().items()}
    sam_v1.update({f"mask_decoder.{k}": v for k, v in mask_decoder.state_dict().items()})
    torch.save(sam_v1, tmp_path / "sam_vit_h_4b8939.pth")
    with pytest.raises(WeightsError, match=r"sam_vit_h_4b8939\.pth.*SAM \(v1\).*expected a SAM2 checkpoint"):
        build_hrmedseg_sam2(small_encoder(), decoder=tmp_path / "sam_vit_h_4b8939.pth")
    torch.save(small_encoder().state_dict(), tmp_path / "SAM_PFD_10K.pth")
    with pytest.raises(WeightsError, match=r"SAM_PFD_10K\.pth.*LGViT"):
        build_hrmedseg_sam2(small_encoder(), decoder=tmp_path / "SAM_PFD_10K.pth")
    save_encoder(small_encoder(), tmp_path / "enc.pt")
    with pytest.raises(WeightsError, match=r"enc\.pt.*'lgvit_neck'.*expected a SAM2 decoder"):
        build_hrmedseg_sam2(small_encoder(), decoder=tmp_path / "enc.pt")


def test_truncated_decoder_is_refused(sam21_tiny_state, tmp_path):
    state = {k: v for k, v in sam21_tiny_state.items() if k != "no_mem_embed"}
    torch.save({"model": state}, tmp_path / "cut.pt")
    with pytest.raises(WeightsError, match=r"cut\.pt.*no_mem_embed"):
        build_hrmedseg_sam2(small_encoder(), decoder=tmp_path / "cut.pt")


def test_save_and_load_round_trip(sam21_tiny_file, tmp_path):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model, metadata = build_hrmedseg_sam2_with_metadata(small_encoder(Preprocessing.hrmedseg_release()), decoder=sam21_tiny_file)
    with torch.no_grad():  # as after fine-tuning: the fine levels now carry signal
        model.image_encoder.neck.proj4.weight.normal_(0, 0.1)
        model.image_encoder.neck.proj8.weight.normal_(0, 0.1)
    path = save_hrmedseg_sam2(model, tmp_path / "hrmedseg_sam2.pt", settings=metadata.sam2)
    loaded = load_hrmedseg_sam2(path)
    assert loaded.image_encoder.preprocessing == Preprocessing.hrmedseg_release()
    assert hrmedseg_sam2_from_checkpoint(read_checkpoint(path)).metadata.sam2 == metadata.sam2
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    logits = []
    for m in (model, loaded):
        predictor = SAM2ImagePredictor(m)
        predictor.set_image(image)
        logits.append(predictor.predict(box=np.array([4, 4, 40, 30]), return_logits=True)[0])
    assert np.allclose(logits[0], logits[1], atol=1e-4)
