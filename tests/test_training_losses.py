"""Losses and metrics of the fine-tuning recipe."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hrmedseg.training.losses import dice_loss, embedding_mse, focal_loss, segmentation_loss
from hrmedseg.training.metrics import dice_per_mask, iou_per_mask, otsu_foreground


def test_dice_loss_near_zero_when_right_and_near_one_when_wrong():
    target = torch.zeros(2, 32, 32)
    target[:, 8:20, 8:20] = 1
    right = (target * 2 - 1) * 20
    assert dice_loss(right, target).item() < 0.01
    assert dice_loss(-right, target).item() > 0.95


def test_focal_term_follows_the_authors_formula():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 16, 16), (torch.rand(3, 16, 16) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(logits, target).item()
    expected = 0.8 * (1 - math.exp(-bce)) ** 2 * bce
    assert abs(focal_loss(logits, target).item() - expected) < 1e-6
    combined = segmentation_loss(logits, target).item()
    assert abs(combined - (0.8 * dice_loss(logits, target).item() + 0.2 * expected)) < 1e-6


def test_loss_has_gradients_under_bfloat16_inputs():
    logits = torch.randn(2, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    loss = segmentation_loss(logits, torch.ones(2, 8, 8))
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad is not None
    assert embedding_mse(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)).item() == 1.0


def test_dice_and_iou_metrics():
    a = torch.zeros(3, 10, 10, dtype=torch.bool)
    b = torch.zeros(3, 10, 10, dtype=torch.bool)
    a[0, :5], b[0, :5] = True, True  # identical
    a[1, :4], b[1, 2:6] = True, True  # half overlap: dice 0.5, iou 1/3
    d, i = dice_per_mask(a, b), iou_per_mask(a, b)
    assert d.tolist()[:2] == [1.0, 0.5] and d[2] == 1.0  # both empty counts as right
    assert abs(i[1].item() - 1 / 3) < 1e-6
    assert torch.isnan(dice_per_mask(a[2:], b[2:], empty_score=float("nan"))).all()


def test_otsu_baseline_separates_bright_objects():
    image = np.full((40, 40), 20, np.uint8)
    image[10:20, 10:20] = 220
    fg = otsu_foreground(image)
    assert fg.sum() == 100 and fg[15, 15]
    assert not otsu_foreground(np.zeros((5, 5), np.uint8)).any()
    # dark nuclei on bright tissue: auto polarity takes the smaller, darker class
    assert otsu_foreground(255 - image).sum() == 1500
    dark = otsu_foreground(255 - image, auto_polarity=True)
    assert dark.sum() == 100 and dark[15, 15]
