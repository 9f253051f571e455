"""Segmentation losses of the HRMedSeg recipe: 0.8 * Dice + 0.2 * focal, on sigmoid outputs.

The focal term follows the authors' code: ``0.8 * (1 - exp(-BCE))**2 * BCE`` on the mean BCE,
not the per-pixel focal loss of Lin et al.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_WEIGHT = 0.8
FOCAL_WEIGHT = 0.2
FOCAL_ALPHA = 0.8
FOCAL_GAMMA = 2.0


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per mask, averaged.

    Args:
        logits: (N, ...) raw scores; each leading index is one mask (object or class channel).
        target: same shape, 0..1 (soft targets allowed).
    """
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    intersection = (prob * target).sum(1)
    dice = (2 * intersection + smooth) / (prob.sum(1) + target.sum(1) + smooth)
    return (1 - dice).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The authors' focal term: alpha * (1 - exp(-BCE))^gamma * BCE, with BCE the mean over pixels."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return FOCAL_ALPHA * (1 - torch.exp(-bce)) ** FOCAL_GAMMA * bce


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.8 * Dice + 0.2 * focal (the paper's fine-tuning loss). Shapes: (N, ...) both."""
    return DICE_WEIGHT * dice_loss(logits, target) + FOCAL_WEIGHT * focal_loss(logits, target)


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distillation loss: MSE between (B, 256, h, w) embeddings, computed in float32."""
    return F.mse_loss(student.float(), teacher.float())
