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


def match_instances(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Instance quality of a label image (H, W) against ground-truth labels (H, W), 0 = background.

    A predicted and a true object match when their IoU exceeds ``iou_threshold`` (at 0.5 or
    more, matches are one-to-one). Returns {"f1", "matched_dice" (mean Dice of matched pairs,
    nan without any), "tp", "n_pred", "n_gt"}.
    """
    if not 0.5 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold {iou_threshold} must be in [0.5, 1) for one-to-one matches")
    p = np.asarray(pred).ravel().astype(np.int64)
    g = np.asarray(gt).ravel().astype(np.int64)
    both = (p > 0) & (g > 0)
    pairs, inter = np.unique(np.stack([p[both], g[both]]), axis=1, return_counts=True)
    p_area, g_area = np.bincount(p), np.bincount(g)
    sums = p_area[pairs[0]] + g_area[pairs[1]]
    matched = inter / np.maximum(sums - inter, 1) > iou_threshold
    n_pred, n_gt = int((p_area[1:] > 0).sum()), int((g_area[1:] > 0).sum())
    tp = int(matched.sum())
    f1 = 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0
    dice = float((2 * inter[matched] / sums[matched]).mean()) if tp else float("nan")
    return {"f1": f1, "matched_dice": dice, "tp": tp, "n_pred": n_pred, "n_gt": n_gt}


def watershed_instances(image: np.ndarray, min_distance: int = 8) -> np.ndarray:
    """The classical baseline: Otsu foreground (either polarity) split by a distance-transform watershed."""
    from hrmedseg.engine.auto import split_instances

    return split_instances(otsu_foreground(image, auto_polarity=True), min_distance)
