"""Held-out evaluation of a prompt-free model on whole images, next to an Otsu-threshold baseline."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .data import discover_samples
from .metrics import dice_per_mask, otsu_foreground


def otsu_minority(image: np.ndarray) -> np.ndarray:
    """Otsu foreground, taking the smaller side as the objects (dark nuclei on bright stain, too)."""
    fg = otsu_foreground(image)
    return ~fg if fg.mean() > 0.5 else fg


@torch.no_grad()
def evaluate_prompt_free(weights: str | os.PathLike, data: str | os.PathLike, device: str = "cpu",
                         max_side: int = 2048) -> dict:
    """Per-image foreground Dice of an HRMedSeg model (channel 0, whole image padded to a multiple
    of 16) and of the Otsu baseline, on every pair of ``data``. Returns means and per-image lists."""
    from hrmedseg.models.hrmedseg_model import load_hrmedseg

    model = load_hrmedseg(weights, device)
    model_dice, otsu_dice = [], []
    for sample in discover_samples(data).samples:
        image, labels = sample.load()
        truth = torch.from_numpy(labels > 0)
        h, w = labels.shape
        if max(h, w) > max_side:
            continue
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().to(device)
        x = model.preprocessing.normalize(x)
        x = F.pad(x, (0, (-w) % 16, 0, (-h) % 16))
        pred = (model(x)[0, 0, :h, :w] > 0).cpu()
        model_dice.append(dice_per_mask(pred[None], truth[None]).item())
        otsu_dice.append(dice_per_mask(torch.from_numpy(otsu_minority(image))[None], truth[None]).item())
    return {"images": len(model_dice), "model_dice": float(np.mean(model_dice)), "otsu_dice": float(np.mean(otsu_dice)),
            "model_per_image": model_dice, "otsu_per_image": otsu_dice}
