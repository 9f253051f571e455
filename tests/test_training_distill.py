"""Distillation: the teacher cache is filled once and reused, the student loads as an encoder, resume, logs."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hrmedseg.errors import HRMedSegError
from hrmedseg.models.encoder_loading import load_encoder
from hrmedseg.training.checkpointing import log_path_for
from hrmedseg.training.distill import DistillConfig, DistillImages, distill, teacher_embed
from hrmedseg.training.teacher_cache import TeacherCache, build_teacher
from test_training_finetune import same_number, tensorboard_scalars


def make_images(root, n=5):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # any sizes and channel layouts
        shape = [(40, 70), (64, 64, 3), (90, 30, 4), (50, 50), (33, 81, 3)][i % 5]
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / f"im{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_cache_holds_the_teachers_output_and_is_reused(tmp_path):
    images = make_images(tmp_path / "imgs")
    events = []
    cfg = DistillConfig(teacher="random:tiny", images=str(images), out=str(tmp_path / "enc.pt"), img_size=64,
                        encoder_preset="tiny", epochs=1, batch_size=2, num_workers=0, device="cpu", log_every=1)
    distill(cfg, events.append)
    assert [e for e in events if e["event"] == "cache"][0]["computed"] == 5
    teacher, teacher_id = build_teacher("random:tiny", 64)
    cache = TeacherCache(cfg.cache_root, teacher_id)
    dataset = DistillImages(sorted(images.glob("*.png")), 64, (124, 116, 104), cache)
    item = dataset[2]
    expected = teacher_embed(teacher, item["image"][None], lambda: torch.autocast("cpu", enabled=False))[0]
    assert item["teacher"].shape == (256, 4, 4) and item["teacher"].dtype == torch.float16
    assert torch.allclose(item["teacher"].float(), expected, atol=2e-3, rtol=1e-2)

    events.clear()
    cfg.epochs, cfg.resume = 2, True
    result = distill(cfg, events.append)
    assert [e for e in events if e["event"] == "cache"][0]["computed"] == 0  # nothing recomputed
    assert [e["epoch"] for e in events if e["event"] == "resumed"] == [1]
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    encoder = load_encoder(cfg.out)
    with torch.no_grad():
        assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 256, 4, 4)


def test_distillation_without_cache_lowers_the_mse(tmp_path):
    images = make_images(tmp_path / "imgs")
    cfg = DistillConfig(teacher="random:tiny", images=str(images), out=str(tmp_path / "enc.pt"), img_size=64,
                        encoder_preset="tiny", epochs=6, batch_size=5, num_workers=0, device="cpu", cache_dir="none")
    result = distill(cfg)
    assert not (tmp_path / "enc.teacher_cache").exists()
    mse = [row["train_loss"] for row in result["history"]]
    assert mse[-1] < 0.5 * mse[0]


def tiny_distill(tmp_path, **kw) -> DistillConfig:
    return DistillConfig(teacher="random:tiny", images=str(tmp_path / "imgs"), out=str(tmp_path / "enc.pt"),
                         img_size=64, encoder_preset="tiny", batch_size=5, num_workers=0, device="cpu", **kw)


def test_tensorboard_scalars_match_the_csv_log(tmp_path):
    pytest.importorskip("tensorboard")
    make_images(tmp_path / "imgs")
    cfg = tiny_distill(tmp_path, epochs=2, cache_dir="none", tensorboard=str(tmp_path / "tb"))
    distill(cfg)
    with open(log_path_for(cfg.out), newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["epoch", "step", "train_loss", "lr", "images_per_s", "time_s"]  # as before
    scalars = tensorboard_scalars(tmp_path / "tb")
    columns = {"step": "step", "train/loss": "train_loss", "lr": "lr", "images_per_s": "images_per_s",
               "time_s": "time_s"}
    assert set(scalars) == set(columns)
    for tag, column in columns.items():
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
        assert all(same_number(value, row[column]) for (_, value), row in zip(scalars[tag], rows)), tag


def test_tensorboard_flag_without_tensorboard_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # "import tensorboard" raises ImportError
    make_images(tmp_path / "imgs")
    cfg = tiny_distill(tmp_path, epochs=1, tensorboard=str(tmp_path / "tb"))
    events = []
    with pytest.raises(HRMedSegError, match="pip install tensorboard"):
        distill(cfg, events.append)
    assert events == [] and not cfg.cache_root.exists() and not (tmp_path / "enc.pt").exists()
    assert not log_path_for(cfg.out).exists() and not (tmp_path / "tb").exists()


def test_time_limit_stops_after_an_epoch_with_the_state_saved_and_resume_goes_on(tmp_path):
    images = make_images(tmp_path / "imgs")
    events = []
    cfg = DistillConfig(teacher="random:tiny", images=str(images), out=str(tmp_path / "enc.pt"), img_size=64,
                        encoder_preset="tiny", epochs=3, batch_size=5, num_workers=0, device="cpu",
                        cache_dir="none", time_limit_min=1e-6, views_per_image=2)
    result = distill(cfg, events.append)
    assert [row["epoch"] for row in result["history"]] == [1]
    assert [e["epoch"] for e in events if e["event"] == "time_limit"] == [1]
    cfg.resume, cfg.time_limit_min = True, None
    assert [row["epoch"] for row in distill(cfg)["history"]] == [1, 2, 3]
