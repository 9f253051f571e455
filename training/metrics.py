"""Evaluation metrics on binary masks (Dice and IoU), and a simple Otsu-threshold baseline."""

from __future__ import annotations

import numpy as np
import torch


def dice_per_mask(pred: torch.Tensor, target: torch.Tensor, empty_score: float = 1.0) -> torch.Tensor:
    """Dice of binary masks, one score per leading index.

    Args:
        pred, target: (N, ...) booleans or 0/1.
        empty_score: the score when both masks are empty (a correct "nothing there").
    Returns:
        (N,) float scores.
    """
    pred = pred.bool().flatten(1)
    target = target.bool().flatten(1)
    inter = (pred & target).sum(1).float()
    total = pred.sum(1).float() + target.sum(1).float()
    dice = 2 * inter / total.clamp(min=1)
    return torch.where(total == 0, torch.full_like(dice, empty_score), dice)


def iou_per_mask(pred: torch.Tensor, target: torch.Tensor, empty_score: float = 1.0) -> torch.Tensor:
    """IoU of binary masks, one score per leading index; (N, ...) -> (N,)."""
    pred = pred.bool().flatten(1)
    target = target.bool().flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    iou = inter / union.clamp(min=1)
    return torch.where(union == 0, torch.full_like(iou, empty_score), iou)


def otsu_foreground(image: np.ndarray, auto_polarity: bool = False) -> np.ndarray:
    """Foreground by Otsu's threshold on the grey image: (H, W[, C]) -> (H, W) bool.

    The brighter class is taken as foreground (fluorescent nuclei); with ``auto_polarity`` the
    darker one instead when the brighter covers more than half the image (stained tissue: dark
    nuclei on a bright background). Returns all-False for a constant image.
    """
    from skimage.filters import threshold_otsu

    grey = image.astype(np.float32)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(-1)
    if grey.max() == grey.min():
        return np.zeros(grey.shape, bool)
    bright = grey > threshold_otsu(grey)
    return ~bright if auto_polarity and bright.mean() > 0.5 else bright
