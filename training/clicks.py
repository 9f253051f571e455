"""SAM's interactive training recipe for box fine-tuning (``--clicks N``).

Per object, after the box prediction, a simulated annotator adds a click where the mask is most
wrong: positive at the centre of the missed part when the false negatives outnumber the false
positives, negative at the centre of the wrong part otherwise (the centre: the distance-transform
maximum of that error, as ``bench/bench_clicks.py``'s annotator picks it). The next prediction is
decoded with the box, every click so far and the previous low-res logits as SAM's mask prompt,
exactly as the engine refines an object. SAM's paper (Kirillov et al. 2023, section A) runs 8 such
iterations plus 2 that feed only the previous mask (one at a random intermediate iteration, one
at the end) and puts the loss on every iteration; :class:`ClickSchedule` does the same with
``clicks`` and ``mask_only`` iterations.

Clicks are sampled on the decoder's low-res grid (S/4 for an S x S input) from the thresholded
logits against the area-averaged target (the grid the loss uses), and given in input pixels at
the centre of their cell, the frame the engine passes native clicks in (``(xy - crop origin) *
crop scale``). The previous logits go back in detached (no gradient through the iterations), with
the model's box prior already added, as the engine keeps them (``ObjectMask.low_res_logits``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hrmedseg.engine.prompts import NEGATIVE, POSITIVE

# (logits (K, 1, h, w) with the box prior, predicted IoU (K, M)) of image i's K objects.
Decode = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# A check for the distance transform's loop: how many erosions between two "anything left?" syncs.
_EROSIONS_PER_CHECK = 8


@dataclass(frozen=True)
class ClickSchedule:
    """The iterations after the box: ``clicks`` that add a click, ``mask_only`` that add none."""

    clicks: int
    mask_only: int = 2

    def plan(self, rng: random.Random) -> list[bool]:
        """One entry per iteration after the box: True adds a click, False feeds only the previous mask.

        As SAM: the first mask-only iteration at a random place among the click iterations (never
        first: there is no mask to refine before a click), the others at the end.
        """
        steps = [True] * self.clicks
        if self.mask_only and self.clicks:
            steps.insert(rng.randint(1, self.clicks), False)
            steps += [False] * (self.mask_only - 1)
        return steps


def distance_inside(region: torch.Tensor) -> torch.Tensor:
    """Approximate Euclidean distance of each pixel of ``region`` to the nearest pixel outside it.

    region: (K, h, w) bool; the grid's border counts as outside (as the annotator's zero padding).
    -> (K, h, w) float32, 0 outside. Counts the erosions each pixel survives, alternating a 3 x 3
    square and a cross (the octagonal distance, within 8% of the Euclidean), on the region's
    device: a few hundred tiny kernels instead of a CPU transform per object.
    """
    inside = region[:, None].float()
    dist = torch.zeros_like(inside)
    for k in range(max(region.shape[-2:])):
        if k % _EROSIONS_PER_CHECK == 0 and not inside.any():
            break
        dist += inside
        outside = F.pad(1 - inside, (1, 1, 1, 1), value=1.0)
        if k % 2:
            grown = torch.maximum(F.max_pool2d(outside, (3, 1), 1)[..., :, 1:-1], F.max_pool2d(outside, (1, 3), 1)[..., 1:-1, :])
        else:
            grown = F.max_pool2d(outside, 3, 1)
        inside = 1 - grown
    return dist[:, 0]


def next_clicks(logits: torch.Tensor, target: torch.Tensor, input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The simulated annotator's next click per object (module docstring).

    logits: (K, 1, h, w) low-res; target: (K, 1, h, w) in 0..1 (area-averaged masks).
    -> points (K, 1, 2) xy input px at a cell centre, labels (K, 1) int (1 positive, 0 negative).
    An object already right everywhere gets a positive click at its own centre (the mask stays
    the same; the engine's objects never have padding points, so neither do these).
    """
    with torch.no_grad():
        pred, truth = logits[:, 0] > 0, target[:, 0] >= 0.5
        missed, wrong = truth & ~pred, pred & ~truth
        positive = missed.flatten(1).sum(1) >= wrong.flatten(1).sum(1)
        error = torch.where(positive[:, None, None], missed, wrong)
        perfect = ~error.flatten(1).any(1)
        error = torch.where(perfect[:, None, None], truth, error)
        dist = distance_inside(error)
        # Ties (a plateau of the distance) go to the plateau's middle; an empty region (an object
        # under half a cell) to its most covered cell.
        score = dist + 0.1 * F.avg_pool2d(dist[:, None], 3, 1, 1, count_include_pad=False)[:, 0] + 1e-3 * target[:, 0]
        h, w = dist.shape[-2:]
        index = score.flatten(1).argmax(1)
        row, col = torch.div(index, w, rounding_mode="floor"), index % w
        xy = torch.stack([(col + 0.5) * (input_size / w), (row + 0.5) * (input_size / h)], dim=1)
        labels = torch.where(positive | perfect, POSITIVE, NEGATIVE).to(torch.int)
    return xy[:, None].float(), labels[:, None]


class InteractiveRefinement:
    """SAM's click iterations for one batch, run inside a box model's forward (so DDP sees one forward).

    ``refine(decode)`` with ``decode(i, boxes_i, points=, point_labels=, mask_inputs=)`` the box
    model's decoder for image i (``BoxPromptedSegmenter`` / ``Sam2BoxPromptedSegmenter``) ->
    per iteration (the box first, then ``plan``'s): ((K, 1, h, w) logits, (K,) predicted IoU),
    K the batch's objects over all images, in image order.

    boxes: per image (K_i, 4) xyxy input px; masks: per image (K_i, S, S) targets;
    plan: :meth:`ClickSchedule.plan`; input_size: S.
    """

    def __init__(self, boxes: list[torch.Tensor], masks: list[torch.Tensor], plan: list[bool], input_size: int) -> None:
        self.boxes, self.masks, self.plan, self.input_size = boxes, masks, plan, input_size

    def __call__(self, decode: Decode) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_image = []
        for i, (boxes, masks) in enumerate(zip(self.boxes, self.masks)):
            if len(boxes):
                per_image.append(self._refine_image(decode, i, boxes, masks))
        return [(torch.cat([it[t][0] for it in per_image]), torch.cat([it[t][1] for it in per_image]))
                for t in range(len(self.plan) + 1)]

    def _refine_image(self, decode: Decode, i: int, boxes: torch.Tensor, masks: torch.Tensor) -> list:
        logits, iou = decode(i, boxes)
        out = [(logits, iou[:, 0])]
        target = F.adaptive_avg_pool2d(masks[:, None].float(), logits.shape[-2:])
        points = labels = None
        for add_click in self.plan:
            if add_click:
                xy, lab = next_clicks(logits, target, self.input_size)
                points = xy if points is None else torch.cat([points, xy], dim=1)
                labels = lab if labels is None else torch.cat([labels, lab], dim=1)
            logits, iou = decode(i, boxes, points=points, point_labels=labels, mask_inputs=logits.detach().float())
            out.append((logits, iou[:, 0]))
        return out


__all__ = ["ClickSchedule", "InteractiveRefinement", "distance_inside", "next_clicks"]
