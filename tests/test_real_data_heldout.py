"""End to end on real annotated images: the prompt-free nuclei model this project trained with
``hrmedseg.training`` (device/train_default_models.sh) beats Otsu's threshold on held-out DSB 2018.

The held-out images are the split of scripts/prepare_device_payload.py (not seen in training);
the loss-falls half of the check is tests/test_training_finetune.py::test_loss_falls_on_real_nuclei.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hrmedseg.training.metrics import otsu_foreground

REPO = Path(__file__).resolve().parents[1]
NUCLEI = REPO.parent / "shared" / "data" / "nuclei_dsb2018"
sys.path.insert(0, str(REPO / "scripts"))
from prepare_device_payload import is_val  # noqa: E402  the split lives in one place


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    total = pred.sum() + gt.sum()
    return float(2 * np.logical_and(pred, gt).sum() / total) if total else 1.0


@pytest.mark.skipif(not NUCLEI.exists(), reason="real DSB 2018 nuclei not available")
def test_trained_nuclei_model_beats_otsu_on_held_out_images():
    from hrmedseg.engine.semantic import SemanticPredictor

    items = [it for it in json.loads((NUCLEI / "manifest.json").read_text())["items"] if is_val(it["name"])]
    assert len(items) == 70
    predictor = SemanticPredictor("hrmedseg_nuclei", device="cpu")
    ours, otsu = [], []
    for item in items:
        image = np.asarray(Image.open(NUCLEI / item["image"]).convert("RGB"))
        truth = np.asarray(Image.open(NUCLEI / item["mask"])) > 0
        ours.append(dice(predictor.predict_logits(image)[0] > 0, truth))
        otsu.append(dice(otsu_foreground(image, auto_polarity=True), truth))
    print(f"held-out Dice: model {np.mean(ours):.4f}, Otsu {np.mean(otsu):.4f}")
    assert np.mean(ours) > np.mean(otsu) + 0.01  # measured: 0.902 vs 0.881 (docs/benchmarks.md)
