"""load_model: one entry point from a file or registry name to a runnable model."""

from __future__ import annotations

import pytest
import torch

from hrmedseg.errors import WeightsError
from hrmedseg.models import EncoderConfig, build_encoder, save_encoder
from hrmedseg.models.loading import load_model, load_model_with_metadata
from hrmedseg.models.preprocessing import Preprocessing
from hrmedseg.models.sam import build_hrmedseg_sam, extract_sam_decoder_state, save_hrmedseg_sam
from hrmedseg.models.sam2 import build_hrmedseg_sam2, save_hrmedseg_sam2
from hrmedseg.weights.bundle import save_bundle

SMALL = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))


def small_encoder(preprocessing: Preprocessing | None = None):
    torch.manual_seed(0)
    return build_encoder(SMALL, preprocessing).eval()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # The registry keeps hash memos in its cache; keep them out of the user's.
    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HRMEDSEG_WEIGHTS_DIR", raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real-format files with random weights: a SAM ViT-B-layout checkpoint, a SAM2.1-tiny
    checkpoint, the compact SAM decoder bundle, an encoder bundle and the authors' raw layout."""
    from sam2.build_sam import build_sam2
    from segment_anything.build_sam import _build_sam

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    sam = _build_sam(encoder_embed_dim=768, encoder_depth=1, encoder_num_heads=12, encoder_global_attn_indexes=[0])
    torch.save(sam.state_dict(), root / "sam_vit_b_01ec64.pth")
    decoder_state = extract_sam_decoder_state(sam.state_dict(), "sam")
    save_bundle(root / "sam_decoder.pt", "sam_prompt_decoder", decoder_state, config={"variant": "vit_b"})
    sam2 = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    torch.save({"model": sam2.state_dict()}, root / "sam2.1_hiera_tiny.pt")
    save_encoder(small_encoder(), root / "encoder.pt")
    torch.save({"model": {f"module.{k}": v for k, v in small_encoder().state_dict().items()}}, root / "SAM_PFD_10K.pth")
    return root


def test_hrmedseg_sam_bundle(files, tmp_path):
    from segment_anything.modeling import Sam

    model = build_hrmedseg_sam(small_encoder(Preprocessing.hrmedseg_release()), decoder=files / "sam_decoder.pt")
    path = save_hrmedseg_sam(model, tmp_path / "finetuned_sam.pt")
    loaded = load_model(path)
    assert isinstance(loaded, Sam)  # predictions of a reloaded bundle: test_sam_models
    own, theirs = model.state_dict(), loaded.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)
    assert torch.equal(loaded.pixel_std, model.pixel_std)
    with pytest.raises(WeightsError, match=r"finetuned_sam\.pt.*complete 'hrmedseg_sam'.*no separate decoder"):
        load_model(path, decoder=files / "sam_decoder.pt")


def test_hrmedseg_sam2_bundle(files, tmp_path):
    from sam2.modeling.sam2_base import SAM2Base

    model = build_hrmedseg_sam2(small_encoder(), decoder=files / "sam2.1_hiera_tiny.pt")
    path = save_hrmedseg_sam2(model, tmp_path / "finetuned_sam2.pt")
    loaded = load_model(path)
    assert isinstance(loaded, SAM2Base)
    own, theirs = model.state_dict(), loaded.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)


def test_bundle_provenance_travels_with_the_model(files, tmp_path):
    """The annotator marks untrained weights from the provenance a loaded model carries."""
    from napari_hrmedseg._model import load_predictor

    untrained = {"source": "test", "trained": False}
    sam = build_hrmedseg_sam(small_encoder(), decoder=files / "sam_decoder.pt")
    sam2 = build_hrmedseg_sam2(small_encoder(), decoder=files / "sam2.1_hiera_tiny.pt")
    paths = [save_hrmedseg_sam(sam, tmp_path / "sam_random.pt", provenance=untrained),
             save_hrmedseg_sam2(sam2, tmp_path / "sam2_random.pt", provenance=untrained)]
    for path in paths:
        assert load_model_with_metadata(path).metadata.provenance["trained"] is False
        _, info = load_predictor(path, device="cpu")
        assert info.untrained, path
    trained = save_hrmedseg_sam(sam, tmp_path / "sam_trained.pt", provenance={"source": "finetune", "trained": True})
    assert not load_predictor(trained, device="cpu")[1].untrained


def test_prompt_free_hrmedseg_bundle(tmp_path):
    from hrmedseg.models import hrmedseg_model

    model = hrmedseg_model.build_hrmedseg(num_classes=2, encoder_config=SMALL).eval()
    path = hrmedseg_model.save_hrmedseg(model, tmp_path / "hrmedseg.pt")
    loaded = load_model(path)
    assert isinstance(loaded, hrmedseg_model.HRMedSeg)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-5)


def test_encoder_alone_asks_for_a_decoder(files):
    with pytest.raises(WeightsError, match=r"encoder\.pt.*only an image encoder.*decoder="):
        load_model(files / "encoder.pt")
    with pytest.raises(WeightsError, match=r"SAM_PFD_10K\.pth.*only an image encoder"):
        load_model(files / "SAM_PFD_10K.pth")


def test_encoder_with_sam_or_sam2_decoder(files):
    from sam2.modeling.sam2_base import SAM2Base
    from segment_anything.modeling import Sam

    sam = load_model(files / "SAM_PFD_10K.pth", decoder=files / "sam_vit_b_01ec64.pth")
    assert isinstance(sam, Sam)
    # The authors' file brings its normalisation quirk into the model.
    assert sam.pixel_std.flatten().tolist() == pytest.approx(list(Preprocessing.hrmedseg_release().pixel_std))
    file_state = torch.load(files / "sam_vit_b_01ec64.pth", weights_only=True)
    assert torch.equal(sam.mask_decoder.iou_token.weight, file_state["mask_decoder.iou_token.weight"])

    assert isinstance(load_model(files / "encoder.pt", decoder=files / "sam_decoder.pt"), Sam)
    sam2 = load_model(files / "encoder.pt", decoder=files / "sam2.1_hiera_tiny.pt")
    assert isinstance(sam2, SAM2Base)
    metadata = load_model_with_metadata(files / "encoder.pt", decoder=files / "sam2.1_hiera_tiny.pt").metadata
    assert metadata.sam2.sam2_config == "sam2.1_hiera_t"


def test_decoders_and_foreign_checkpoints_alone_are_refused(files):
    with pytest.raises(WeightsError, match=r"sam_decoder\.pt.*only a SAM prompt encoder.*decoder="):
        load_model(files / "sam_decoder.pt")
    with pytest.raises(WeightsError, match=r"sam2\.1_hiera_tiny\.pt.*SAM2 checkpoint.*decoder="):
        load_model(files / "sam2.1_hiera_tiny.pt")
    with pytest.raises(WeightsError, match=r"decoder .*encoder\.pt.*not a SAM or SAM2 decoder"):
        load_model(files / "SAM_PFD_10K.pth", decoder=files / "encoder.pt")


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(WeightsError, match=r"not found: .*nowhere\.pt"):
        load_model(tmp_path / "nowhere.pt")
    with pytest.raises(WeightsError, match="no_such_weights"):
        load_model("no_such_weights")


def test_registry_names(files, tmp_path):
    weights_dir = tmp_path / "w"
    weights_dir.mkdir()
    (weights_dir / "SAM_PFD_10K.pth").write_bytes((files / "SAM_PFD_10K.pth").read_bytes())
    with pytest.raises(WeightsError, match=r"hrmedseg_pfd_10k.*only an image encoder"):
        load_model("hrmedseg_pfd_10k", weights_dir=weights_dir)
    model = load_model("hrmedseg_pfd_10k", weights_dir=weights_dir, decoder=files / "sam_decoder.pt")
    assert model.pixel_std.flatten().tolist() == pytest.approx(list(Preprocessing.hrmedseg_release().pixel_std))


def test_bundles_made_by_the_importer_load(files, tmp_path):
    """The weights importer's compact decoder bundles pair with an encoder through load_model."""
    from hrmedseg.models import importing
    from sam2.modeling.sam2_base import SAM2Base
    from segment_anything.modeling import Sam

    sam_decoder = importing.import_checkpoint(files / "sam_vit_b_01ec64.pth", tmp_path / "sam_dec.pt")
    sam2_decoder = importing.import_checkpoint(files / "sam2.1_hiera_tiny.pt", tmp_path / "sam2_dec.pt")
    assert isinstance(load_model(files / "encoder.pt", decoder=sam_decoder), Sam)
    sam2, metadata = load_model_with_metadata(files / "encoder.pt", decoder=sam2_decoder)
    assert isinstance(sam2, SAM2Base)
    assert metadata.sam2.sam2_config == "sam2.1_hiera_t" and metadata.sam2.memory is False
    file_state = torch.load(files / "sam2.1_hiera_tiny.pt", weights_only=True)["model"]
    assert torch.equal(sam2.no_mem_embed, file_state["no_mem_embed"])
