"""A learnt per-object choice between a box model's mask and the ellipse inscribed in the box.

The box prior rule "gate" (:func:`~hrmedseg.models.box_prior.apply_prior_rule`) asks a tiny
logistic model, per object, whether the inscribed ellipse would have the higher Dice than the
model's own mask, from a handful of cheap features of the decoder's output on its low-res grid
(:data:`GATE_FEATURES`). Its weights are fitted on a model's *training* split
(``bench/fit_prior_gate.py``), each object weighted by how much Dice the choice is worth, and
live in a small JSON next to the weights file (``<weights>.prior_gate.json``) or in the bundle's
``config["prior_gate"]``; :func:`find_prior_gate` reads them for the loader.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import WeightsError
from .sidecar import find_sidecar, sidecar_path

GATE_FEATURES = ("score", "iou_ellipse", "aspect", "log_box_area", "box_fill", "boundary_margin")
GATE_SUFFIX = ".prior_gate.json"
_LOGIT_CLIP = 20.0  # region decoders fill cells they skip with -1e4; keep those out of the margin


def gate_features(
    logits: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor, input_size: tuple[int, int], ellipse: torch.Tensor
) -> torch.Tensor:
    """The gate's inputs per object, in the order of :data:`GATE_FEATURES`.

    Args:
        logits: (N, 1, h, w) the model's low-res mask logits (its own box prior added).
        scores: (N,) the decoder's predicted IoU of each mask.
        boxes: (N, 4) xyxy in model-input pixels.
        input_size: (H, W) model-input size.
        ellipse: (N, 1, h, w) the boxes' inscribed-ellipse logits on the same grid.

    Returns:
        (N, 6) float32: predicted IoU; IoU(model mask, ellipse) on the grid; box aspect ratio
        (short side / long side); log of the box's share of the input; the mask's area over the
        box's (both in grid cells); mean |logit| (clipped at 20) on the mask's outline cells
        (how sure the model is where its mask ends; 0 for an empty mask).
    """
    n, (h, w) = len(logits), logits.shape[-2:]
    ours, prior = logits > 0, ellipse > 0
    rows, cols = _occupied_window(ours | prior)  # all that counts lies inside
    ours, prior, logits = ours[..., rows, cols], prior[..., rows, cols], logits[..., rows, cols]
    inter = (ours & prior).flatten(1).sum(1).float()
    union = (ours | prior).flatten(1).sum(1).float().clamp_min(1)
    boxes = boxes.to(logits.device).float()
    bw = (boxes[:, 2] - boxes[:, 0]).clamp_min(1e-3) * (w / input_size[1])  # in grid cells
    bh = (boxes[:, 3] - boxes[:, 1]).clamp_min(1e-3) * (h / input_size[0])
    fill = ours.flatten(1).sum(1).float() / (bw * bh).clamp_min(1)
    m = ours.float()
    outline = (F.max_pool2d(m, 3, 1, 1) + F.max_pool2d(-m, 3, 1, 1)) > 0  # dilation differs from erosion
    margin = (logits.float().abs().clamp_max(_LOGIT_CLIP) * outline).flatten(1).sum(1) / outline.flatten(1).sum(1).clamp_min(1)
    return torch.stack(
        [
            scores.to(logits.device).float().reshape(n),
            inter / union,
            torch.minimum(bw, bh) / torch.maximum(bw, bh),
            torch.log(bw * bh / (h * w)),
            fill,
            margin,
        ],
        dim=1,
    )


def _occupied_window(occupied: torch.Tensor, pad: int = 1) -> tuple[slice, slice]:
    """Rows and columns of the (N, 1, h, w) grid around every True cell of ``occupied``, + ``pad``.

    :func:`gate_features` computes on this window alone, with the whole grid's result: the counts'
    cells lie inside, and so do the outline cells (at most one cell from a mask cell). With
    ``pad`` >= 1 a mask cell's 3 x 3 neighbours all lie inside, and a cell on the window's edge is
    empty, so its dilation sees only mask cells (inside) and its erosion is 0 either way. The
    window spans the batch's masks and ellipses: for a small box, a few cells of 256 x 256.
    """
    occupied = occupied.flatten(0, -3).any(dim=0)  # (h, w)
    ys, xs = occupied.any(dim=1).nonzero(), occupied.any(dim=0).nonzero()
    if len(ys) == 0:  # nothing anywhere: every feature is the same on any window
        return slice(0, 1), slice(0, 1)
    h, w = occupied.shape
    return (slice(max(int(ys[0]) - pad, 0), min(int(ys[-1]) + 1 + pad, h)),
            slice(max(int(xs[0]) - pad, 0), min(int(xs[-1]) + 1 + pad, w)))


@dataclass(frozen=True)
class PriorGate:
    """Logistic model P(ellipse beats the model's mask | features): ``sigmoid(w . (x - mean) / std + b)``.

    Attributes:
        weights, mean, std: one value per feature, in the order of ``features``.
        bias: the intercept.
        features: the feature names (must be :data:`GATE_FEATURES`).
        provenance: how it was fitted (data, date, command), kept with it for the model card.
    """

    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    features: tuple[str, ...] = GATE_FEATURES
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if tuple(self.features) != GATE_FEATURES:
            raise WeightsError(f"prior gate features {list(self.features)} are not this version's {list(GATE_FEATURES)}")
        sizes = {len(self.weights), len(self.mean), len(self.std)}
        if sizes != {len(GATE_FEATURES)} or not all(math.isfinite(v) for v in (*self.weights, *self.mean, *self.std, self.bias)):
            raise WeightsError(f"prior gate needs {len(GATE_FEATURES)} finite weights, means and stds; got {sorted(sizes)}")
        if min(self.std) <= 0:
            raise WeightsError("prior gate stds must be positive")

    def prob_ellipse(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) probability that the ellipse has the higher Dice, from (N, F) :func:`gate_features`."""
        t = features.new_tensor
        return torch.sigmoid(((features - t(self.mean)) / t(self.std)) @ t(self.weights) + self.bias)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "weights": list(self.weights), "bias": self.bias,
                "mean": list(self.mean), "std": list(self.std), "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "prior gate") -> "PriorGate":
        try:
            return cls(tuple(map(float, d["weights"])), float(d["bias"]), tuple(map(float, d["mean"])),
                       tuple(map(float, d["std"])), tuple(d.get("features", GATE_FEATURES)), dict(d.get("provenance", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{source}: not a prior gate ({type(e).__name__}: {e})") from e


def gate_path(weights_path: str | os.PathLike) -> Path:
    """Where the gate of a weights file lives: ``model.pt`` -> ``model.prior_gate.json``."""
    return sidecar_path(weights_path, GATE_SUFFIX)


def find_prior_gate(weights_path: str | os.PathLike | None, config: Mapping[str, Any]) -> PriorGate | None:
    """The gate of a model: its bundle's ``config["prior_gate"]``, else the JSON beside its file, else None."""
    found = find_sidecar(weights_path, config, "prior_gate", GATE_SUFFIX)
    return None if found is None else PriorGate.from_dict(*found)


__all__ = ["GATE_FEATURES", "GATE_SUFFIX", "PriorGate", "find_prior_gate", "gate_features", "gate_path"]
