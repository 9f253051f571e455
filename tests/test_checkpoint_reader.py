"""hrmedseg.weights.checkpoint: the one reader that says what a weights file is, read once."""

from __future__ import annotations

import pytest
import torch

from hrmedseg.errors import WeightsError
from hrmedseg.models import EncoderConfig, build_encoder, save_encoder
from hrmedseg.models.hrmedseg_model import build_hrmedseg, save_hrmedseg
from hrmedseg.models.loading import load_model, load_model_with_metadata
from hrmedseg.models.sam import build_hrmedseg_sam, build_sam_prompt_decoder, save_hrmedseg_sam
from hrmedseg.weights.bundle import save_bundle
from hrmedseg.weights.checkpoint import extract_sam_decoder_state, read_checkpoint, unwrap_state_dict

SMALL = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))


def small_encoder():
    torch.manual_seed(0)
    return build_encoder(SMALL).eval()


def sam_decoder_state() -> dict[str, torch.Tensor]:
    prompt_encoder, mask_decoder = build_sam_prompt_decoder()
    state = {f"prompt_encoder.{k}": v for k, v in prompt_encoder.state_dict().items()}
    state.update({f"mask_decoder.{k}": v for k, v in mask_decoder.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    decoder = sam_decoder_state()
    full_sam = dict(decoder, **{"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)})
    torch.save(full_sam, root / "sam_vit_b.pth")
    torch.save({"model": {"sam_mask_decoder.x": torch.ones(1), "sam_prompt_encoder.y": torch.ones(1)}}, root / "sam2.pt")
    torch.save({"model": {f"module.{k}": v for k, v in small_encoder().state_dict().items()}}, root / "SAM_PFD_10K.pth")
    save_encoder(small_encoder(), root / "encoder.pt", provenance={"source": "test"})
    save_bundle(root / "decoder.pt", "sam_prompt_decoder", decoder, config={"variant": "vit_b"})
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, root / "resnet.pth")
    torch.save([1, 2, 3], root / "list.pt")
    model = build_hrmedseg(1, SMALL).eval()
    save_hrmedseg(model, root / "semantic.pt", provenance={"input_mode": "crop", "scale": 1.0, "img_size": 64})
    sam = build_hrmedseg_sam(small_encoder())
    save_hrmedseg_sam(sam, root / "box.pt", provenance={"trained": False}, box_prior="ellipse")
    return root


@pytest.mark.parametrize(
    "name, kind, is_bundle",
    [
        ("sam_vit_b.pth", "sam", False),
        ("sam2.pt", "sam2", False),
        ("SAM_PFD_10K.pth", "lgvit_neck", False),
        ("encoder.pt", "lgvit_neck", True),
        ("decoder.pt", "sam_prompt_decoder", True),
        ("semantic.pt", "hrmedseg", True),
        ("box.pt", "hrmedseg_sam", True),
        ("resnet.pth", "unknown", False),
        ("list.pt", "unknown", False),
    ],
)
def test_kind_of_each_format(files, name, kind, is_bundle):
    checkpoint = read_checkpoint(files / name)
    assert (checkpoint.kind, checkpoint.is_bundle) == (kind, is_bundle)
    assert checkpoint.path == files / name


def test_state_is_unwrapped_and_bundle_records_come_along(files):
    raw = read_checkpoint(files / "SAM_PFD_10K.pth")
    assert set(raw.state) == set(small_encoder().state_dict())  # 'model' wrapper and 'module.' prefix gone
    assert raw.config == {} and raw.provenance == {}
    encoder = read_checkpoint(files / "encoder.pt")
    assert encoder.provenance == {"source": "test"} and encoder.config == SMALL.to_dict()
    assert encoder.preprocessing and set(encoder.state) == set(small_encoder().state_dict())
    assert read_checkpoint(files / "resnet.pth").contents == "['conv1.weight']"
    assert read_checkpoint(files / "list.pt").contents == "list"


def test_unreadable_and_malformed_files_are_named(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"garbage\.pt"):
        read_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(WeightsError, match=r"nothere\.pt"):
        read_checkpoint(tmp_path / "nothere.pt")
    torch.save({"format": "hrmedseg-bundle", "architecture": "hrmedseg"}, tmp_path / "half.pt")
    with pytest.raises(WeightsError, match=r"half\.pt is an hrmedseg bundle without"):
        read_checkpoint(tmp_path / "half.pt")
    with pytest.raises(WeightsError, match=r"list\.pt holds no state dict of tensors"):
        unwrap_state_dict([1], "list.pt")


def test_wrong_architecture_error_names_the_file(files):
    with pytest.raises(WeightsError, match=r"encoder\.pt holds weights for architecture 'lgvit_neck', expected hrmedseg_sam"):
        read_checkpoint(files / "encoder.pt").require_bundle("hrmedseg_sam")
    with pytest.raises(WeightsError, match=r"SAM_PFD_10K\.pth is not an hrmedseg bundle"):
        read_checkpoint(files / "SAM_PFD_10K.pth").require_bundle("lgvit_neck")
    from hrmedseg.models.hrmedseg_model import load_hrmedseg
    from hrmedseg.models.sam import load_hrmedseg_sam

    with pytest.raises(WeightsError, match=r"semantic\.pt holds weights for architecture 'hrmedseg', expected hrmedseg_sam"):
        load_hrmedseg_sam(files / "semantic.pt")
    with pytest.raises(WeightsError, match=r"box\.pt holds weights for architecture 'hrmedseg_sam', expected hrmedseg\b"):
        load_hrmedseg(files / "box.pt")


def test_one_sam_decoder_extraction(files):
    state = read_checkpoint(files / "sam_vit_b.pth").state
    decoder = extract_sam_decoder_state(state, "sam_vit_b.pth")
    assert set(decoder) == set(sam_decoder_state())
    with pytest.raises(WeightsError, match=r"sam2\.pt is a SAM2 checkpoint"):
        extract_sam_decoder_state(read_checkpoint(files / "sam2.pt").state, "sam2.pt")
    with pytest.raises(WeightsError, match=r"resnet\.pth holds no SAM prompt encoder"):
        extract_sam_decoder_state(read_checkpoint(files / "resnet.pth").state, "resnet.pth")


@pytest.fixture
def torch_loads(monkeypatch) -> list[str]:
    """The files torch.load is called on while the test runs."""
    calls: list[str] = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: calls.append(str(f)) or real(f, *a, **k))
    return calls


def test_load_model_reads_each_file_once(files, torch_loads):
    torch_calls = torch_loads
    model, metadata = load_model_with_metadata(files / "box.pt")
    assert torch_calls == [str(files / "box.pt")]
    assert metadata.kind == "hrmedseg_sam" and metadata.box_prior == "ellipse" and metadata.untrained
    assert metadata.provenance == {"trained": False} and metadata.input_size == 1024
    torch_calls.clear()
    load_model(files / "SAM_PFD_10K.pth", decoder=files / "decoder.pt")
    assert torch_calls == [str(files / "SAM_PFD_10K.pth"), str(files / "decoder.pt")]


def test_semantic_predictor_reads_the_file_once(files, torch_loads):
    from hrmedseg.engine.semantic import SemanticPredictor

    torch_calls = torch_loads
    predictor = SemanticPredictor(str(files / "semantic.pt"), device="cpu")
    assert torch_calls == [str(files / "semantic.pt")]
    assert predictor.provenance["input_mode"] == "crop" and predictor.geometry.img_size == 64


def test_box_predictor_takes_the_prior_and_provenance_from_the_metadata(files):
    from hrmedseg.engine import BoxPredictor

    predictor = BoxPredictor(str(files / "box.pt"), device="cpu", backend="reference")
    assert predictor.metadata.box_prior == "ellipse" and predictor.metadata.untrained
    assert not hasattr(predictor.model, "box_prior") and not hasattr(predictor.model, "hrmedseg_provenance")
    plain = BoxPredictor(predictor.model, device="cpu", backend="reference")
    assert plain.metadata.box_prior == "none" and not plain.metadata.untrained
