"""Distillation from a SAM2/SAM2.1 teacher: three-level targets, cache, an hrmedseg_sam2 bundle out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sam2")

from hrmedseg.errors import InputError  # noqa: E402
from hrmedseg.models.sam2 import HRMedSegSam2ImageEncoder, hrmedseg_sam2_from_checkpoint  # noqa: E402
from hrmedseg.training.distill import DistillConfig, DistillImages, distill, teacher_embed  # noqa: E402
from hrmedseg.training.teacher_cache import Sam2Teacher, TeacherCache, build_teacher  # noqa: E402
from hrmedseg.weights.checkpoint import read_checkpoint  # noqa: E402


def make_images(root, n=3):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(64, 64, 3), (100, 70), (128, 96, 3)][:n]):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / f"im{i}.png")
    return root


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory):
    from sam2.build_sam import build_sam2

    torch.manual_seed(1)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    path = tmp_path_factory.mktemp("teacher") / "sam2.1_tiny_random.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_sam2_checkpoint_teacher_gives_three_levels(sam2_file):
    teacher, teacher_id = build_teacher(str(sam2_file), 128)
    assert isinstance(teacher, Sam2Teacher) and teacher.sam2_config == "sam2.1_hiera_t"
    assert teacher_id.startswith("sam2.1_hiera_t-") and teacher_id.endswith("@128")
    out = teacher_embed(teacher, torch.randint(0, 255, (1, 3, 128, 128), dtype=torch.uint8),
                        lambda: torch.autocast("cpu", enabled=False))
    assert [tuple(t.shape) for t in out] == [(1, 256, 32, 32), (1, 256, 16, 16), (1, 256, 8, 8)]
    with pytest.raises(InputError, match="multiple of 32"):
        build_teacher(str(sam2_file), 80)


def test_distill_from_sam2_checkpoint_with_cache(sam2_file, tmp_path):
    images = make_images(tmp_path / "imgs")
    events = []
    cfg = DistillConfig(teacher=str(sam2_file), images=str(images), out=str(tmp_path / "student.pt"), img_size=128,
                        encoder_preset="tiny", epochs=2, max_steps=2, batch_size=2, num_workers=0, device="cpu",
                        log_every=1, lr=1e-3)
    distill(cfg, events.append)
    assert [e for e in events if e["event"] == "cache"][0]["computed"] == 3
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 2 and all(np.isfinite(losses))

    teacher, teacher_id = build_teacher(str(sam2_file), 128)
    cache = TeacherCache(cfg.cache_root, teacher_id)
    item = DistillImages(sorted(images.glob("*.png")), 128, (124, 116, 104), cache)[1]
    expected = teacher_embed(teacher, item["image"][None], lambda: torch.autocast("cpu", enabled=False))
    assert [tuple(t.shape) for t in item["teacher"]] == [(256, 32, 32), (256, 16, 16), (256, 8, 8)]
    for got, want in zip(item["teacher"], expected):
        assert got.dtype == torch.float16
        assert torch.allclose(got.float(), want[0], atol=2e-3, rtol=1e-2)

    model, metadata = hrmedseg_sam2_from_checkpoint(read_checkpoint(cfg.out))
    assert isinstance(model.image_encoder, HRMedSegSam2ImageEncoder)
    assert metadata.sam2.sam2_config == "sam2.1_hiera_t"
    # The teacher's heads came along; the student's fine levels were trained (they start at zero).
    assert torch.equal(model.sam_mask_decoder.conv_s0.weight, teacher.decoder_state["sam_mask_decoder.conv_s0.weight"])
    assert model.image_encoder.neck.proj4.weight.abs().sum() > 0
    with torch.no_grad():
        fpn = model.image_encoder(torch.zeros(1, 3, 128, 128))["backbone_fpn"]
    assert [tuple(t.shape) for t in fpn] == [(1, 256, 32, 32), (1, 256, 16, 16), (1, 256, 8, 8)]


def test_distill_from_random_sam2_teacher_lowers_the_loss(tmp_path):
    images = make_images(tmp_path / "imgs")
    cfg = DistillConfig(teacher="random:sam2.1_hiera_t", images=str(images), out=str(tmp_path / "s.pt"), img_size=64,
                        encoder_preset="tiny", epochs=4, batch_size=3, num_workers=0, device="cpu", cache_dir="none")
    result = distill(cfg)
    loss = [row["train_loss"] for row in result["history"]]
    assert all(np.isfinite(loss)) and loss[-1] < loss[0]
    assert hrmedseg_sam2_from_checkpoint(read_checkpoint(cfg.out)).metadata.sam2.sam2_config == "sam2.1_hiera_t"


def test_sam2_teacher_needs_multiples_of_32(tmp_path):
    images = make_images(tmp_path / "imgs", n=1)
    cfg = DistillConfig(teacher="random:sam2.1_hiera_t", images=str(images), out=str(tmp_path / "s.pt"), img_size=80,
                        encoder_preset="tiny", epochs=1, num_workers=0, device="cpu", cache_dir="none")
    with pytest.raises(InputError, match="multiple of 32"):
        distill(cfg)
    with pytest.raises(InputError, match="unknown random teacher"):
        build_teacher("random:sam2_nonsense", 64)
