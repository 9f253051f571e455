"""A shape prior added to box-prompted mask logits: the ellipse inscribed in each box.

Cells and nuclei, optic discs and cups are close to the ellipse inscribed in their box (that
ellipse alone scores about 0.88 Dice on DSB nuclei). A model trained with this prior added to
its decoder's logits learns only the correction, so it starts from the ellipse rather than from
nothing. The prior is part of the model: its bundle records ``config["box_prior"]`` and the
loader returns it as ``ModelMetadata.box_prior`` (``load_model_with_metadata``); the training
loop and the box engine add it to the low-res logits. Callers of ``SamPredictor`` add it with :func:`add_box_prior` on ``return_logits``
low-res outputs.

What the engine returns per box is chosen by :func:`apply_prior_rule` (``BoxPredictor(prior=...)``,
``hrmedseg segment --prior``): the model's mask ("model", the default), the inscribed ellipse
("ellipse"), or "auto": the ellipse only where the model itself cannot tell it from its own mask,
i.e. where the IoU of its mask with the ellipse is at least the IoU it predicts for its mask (no
tuned constant: it trusts the model's mask exactly as far as the model's own score says), or
"gate": a logistic model fitted on the model's training split picks, per object, the one of the
two it expects to have the higher Dice (:mod:`hrmedseg.models.prior_gate`).
"""

from __future__ import annotations

import torch

from .prior_gate import GATE_FEATURES, PriorGate, gate_features

BOX_PRIORS = ("none", "ellipse")
PRIOR_RULES = ("model", "ellipse", "auto", "gate")
DEFAULT_PRIOR_RULE = "gate"  # the engine's and `hrmedseg segment --prior`'s; "model" for models without a gate
PRIOR_STRENGTH = 4.0  # logit at the ellipse's centre; 0 on its outline


def ellipse_prior_logits(
    boxes: torch.Tensor, grid: tuple[int, int], input_size: tuple[int, int], strength: float = PRIOR_STRENGTH
) -> torch.Tensor:
    """Logits of the inscribed ellipse of each box, on the low-res grid.

    Args:
        boxes: (N, 4) xyxy in model-input pixels.
        grid: (h, w) of the low-res logit grid that covers the (H, W) input.
        input_size: (H, W) model-input size.

    Returns:
        (N, 1, h, w): ``strength * (1 - r)`` with r the ellipse radius of each cell centre
        (r = 1 on the outline), clipped below at ``-2 * strength``.
    """
    h, w = grid
    boxes = boxes.float()
    ys = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) * (input_size[0] / h)
    xs = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) * (input_size[1] / w)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    # Half-sides of at least half a cell keep degenerate boxes finite.
    rx = ((boxes[:, 2] - boxes[:, 0]) / 2).clamp_min(input_size[1] / w / 2)
    ry = ((boxes[:, 3] - boxes[:, 1]) / 2).clamp_min(input_size[0] / h / 2)
    dy = (ys[None, :, None] - cy[:, None, None]) / ry[:, None, None]
    dx = (xs[None, None, :] - cx[:, None, None]) / rx[:, None, None]
    r = torch.sqrt(dx.square() + dy.square())
    return (strength * (1 - r)).clamp_min(-2 * strength)[:, None]


def add_box_prior(
    logits: torch.Tensor, boxes: torch.Tensor, input_size: tuple[int, int], prior: str = "ellipse",
    ellipse: torch.Tensor | None = None,
) -> torch.Tensor:
    """``logits`` (N, 1, h, w) plus the named prior of ``boxes`` (N, 4) input-pixel xyxy
    (``ellipse``: its :func:`ellipse_prior_logits` when the caller already has them)."""
    if prior == "none":
        return logits
    if prior != "ellipse":
        raise ValueError(f"unknown box prior {prior!r}; expected one of {', '.join(BOX_PRIORS)}")
    if ellipse is None:
        ellipse = ellipse_prior_logits(boxes.to(logits.device), logits.shape[-2:], input_size)
    return logits + ellipse.to(logits.dtype)


def apply_prior_rule(
    logits: torch.Tensor,
    scores: torch.Tensor,
    boxes: torch.Tensor,
    input_size: tuple[int, int],
    rule: str = "model",
    gate: PriorGate | None = None,
    ellipse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per object, the model's logits or the ellipse's, by ``rule`` (one of :data:`PRIOR_RULES`).

    Args:
        logits: (N, 1, h, w) the model's low-res mask logits (with its own box prior added).
        scores: (N,) the decoder's predicted IoU of each mask.
        boxes: (N, 4) xyxy in model-input pixels.
        input_size: (H, W) model-input size.
        rule: see Returns.
        gate: the model's fitted :class:`~hrmedseg.models.prior_gate.PriorGate`, for "gate";
            without one "gate" keeps the model's logits (the caller says so: the engine warns).
        ellipse: (N, 1, h, w) :func:`ellipse_prior_logits` of ``boxes`` when the caller already
            has them (the engine does, for the model's own prior); computed here otherwise.

    Returns:
        (N, 1, h, w): "model" ``logits`` unchanged; "ellipse" the ellipse's logits of every
        box; "auto" the ellipse's logits for objects where IoU(model mask, ellipse) >= score (the
        ellipse lies within the model's own predicted error of its mask, so the model has no
        evidence against the prior), the model's elsewhere; "gate" the ellipse's logits where
        ``gate`` gives the ellipse the higher chance (> 0.5) of the better Dice, from
        :func:`~hrmedseg.models.prior_gate.gate_features`.
    """
    if rule not in PRIOR_RULES:
        raise ValueError(f"unknown prior rule {rule!r}; expected one of {', '.join(PRIOR_RULES)}")
    if rule == "model" or (rule == "gate" and gate is None):
        return logits
    if ellipse is None:
        ellipse = ellipse_prior_logits(boxes.to(logits.device), logits.shape[-2:], input_size)
    ellipse = ellipse.to(logits.dtype)
    if rule == "ellipse":
        return ellipse
    features = gate_features(logits, scores, boxes, input_size, ellipse)
    if rule == "auto":
        use_prior = features[:, GATE_FEATURES.index("iou_ellipse")] >= features[:, GATE_FEATURES.index("score")]
    else:
        use_prior = gate.prob_ellipse(features) > 0.5
    return torch.where(use_prior.view(-1, 1, 1, 1), ellipse, logits)
