"""A click corrects the part of the mask under it: the "local" and "pixel" click updates.

SAM's predictor (the "sam" update) recomputes the whole mask from the box, all clicks and the
previous low-res logits as mask prompt. For models trained with boxes only (ours, MedSAM,
LiteMedSAM) that recomputation moves the mask everywhere, not only where the annotator clicked,
and a click often makes the mask worse (docs/benchmarks.md, "Clicks on top of a box").

The "local" update keeps the previous mask and takes the decoder's new logits only in the region
the newest click is about: for a positive click, the connected part of the pixels the new mask
adds that holds the click; for a negative one, the connected part of the pixels it removes that
holds the click; both limited to the object's box grown by half its size (a click next to the
box may extend the object, a leak far off may not) and to a disc around the click of
``REACH`` times the click's distance from the previous mask's edge (a click in the middle of a
missed band fills the band, not the whole blob the decoder drew through it). Where the new mask
does not change the clicked pixel in the click's direction, nothing changes. Everything else
keeps the previous logits, so the next click starts from exactly what the annotator saw.

``REACH`` 1.5 and decoding without the mask prompt were chosen on 30 DSB *training* nuclei
(bench_clicks.py's simulated annotator, ``hrmedseg_sam_default``): Dice after 1 / 3 / 5 clicks
0.906 / 0.901 / 0.899 against 0.902 / 0.869 / 0.878 with reach 3, 0.897 / 0.830 / 0.834 without
the disc, 0.788 / 0.783 / 0.783 feeding the mask prompt, and 0.545 / 0.501 / 0.501 for SAM's
update (box alone 0.917). Held-out figures: docs/benchmarks.md.

The "pixel" update (:func:`fix_clicked_pixels`, :class:`ClickFix`) does not re-decode a boxed
object at all: its logits are its box's alone, and each click, in order, moves the mask's
threshold locally at native resolution: a positive click on a background pixel p adds the pixels
connected to p whose (bilinearly upsampled) logit is at least p's, within a disc around p of
``reach`` click depths (bounded by a share of the box side); a negative click removes those at
most p's. Why: on DSB nuclei most errors left after the box are bands of 1-2 native pixels,
thinner than the decoder's low-res cell, where the decoder's new mask does not change the
clicked pixel (docs/benchmarks.md). The clicked pixel always flips, nothing beyond the disc
changes, and the mask is a function of the box and the clicks alone: a store's re-run, and an
undo followed by the same click, give the very same mask. Objects of clicks alone (no box) are
decoded from their clicks with the "local" update, then fixed the same way.

Low-res tensors are logits in the decoder's (h, w) output grid of the crop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import InputError, WeightsError

CLICK_UPDATES = ("sam", "local", "pixel")
REACH = 1.5  # the update's disc radius, in click depths (see above)
BOX_GROWTH = 0.5  # the update region: the box grown by this share of its larger side on every side


def check_click_update(name: str) -> str:
    """``name`` if it is one of ``CLICK_UPDATES``, else an InputError naming the choices."""
    if name not in CLICK_UPDATES:
        raise InputError(f"unknown click_update {name!r} (use {', '.join(CLICK_UPDATES)})")
    return name


def clicked_region(new_fg: np.ndarray, old_fg: np.ndarray, click_yx: tuple[int, int], positive: bool,
                   bounds: tuple[int, int, int, int]) -> np.ndarray:
    """(h, w) bool: the connected part of what the new mask adds (``positive``) or removes that
    holds ``click_yx``, inside ``bounds`` (y0, y1, x0, x1) and the click's ``REACH`` disc; all
    False when the click is not in it."""
    from scipy import ndimage

    change = (new_fg & ~old_fg) if positive else (old_fg & ~new_fg)
    inside = np.zeros_like(change)
    y0, y1, x0, x1 = bounds
    inside[y0:y1, x0:x1] = change[y0:y1, x0:x1]
    y, x = click_yx
    if not (0 <= y < inside.shape[0] and 0 <= x < inside.shape[1]) or not inside[y, x]:
        return np.zeros_like(change)
    # the click's depth: its distance from the old mask's edge (outside it, or inside for a negative click)
    depth = ndimage.distance_transform_edt(np.pad(~old_fg if positive else old_fg, 1))[1:-1, 1:-1][y, x]
    yy, xx = np.ogrid[: inside.shape[0], : inside.shape[1]]
    inside &= (yy - y) ** 2 + (xx - x) ** 2 <= (REACH * max(depth, 1.0) + 1) ** 2
    parts, _ = ndimage.label(inside, structure=np.ones((3, 3), bool))
    return parts == parts[y, x]


def local_click_update(
    new_logits: torch.Tensor,
    old_logits: torch.Tensor,
    clicks_xy: np.ndarray,
    positive: np.ndarray,
    boxes_xyxy: np.ndarray | None,
    threshold: float = 0.0,
) -> torch.Tensor:
    """(N, 1, h, w) logits: ``old_logits`` with ``new_logits`` in each object's clicked region.

    clicks_xy: (N, 2) the newest click per object in low-res grid pixels (x, y); positive: (N,)
    bool; boxes_xyxy: (N, 4) the objects' boxes in low-res grid pixels, or None (clicks alone:
    the whole grid may change).
    """
    h, w = new_logits.shape[-2:]
    old_logits = old_logits.to(new_logits.device, new_logits.dtype)
    new_fg = (new_logits[:, 0] > threshold).cpu().numpy()
    old_fg = (old_logits[:, 0] > threshold).cpu().numpy()
    take = np.zeros((len(new_fg), h, w), bool)
    for n in range(len(new_fg)):
        bounds = (0, h, 0, w) if boxes_xyxy is None or not np.isfinite(boxes_xyxy[n]).all() else grown_bounds(boxes_xyxy[n], (h, w))
        click = (int(np.floor(clicks_xy[n, 1])), int(np.floor(clicks_xy[n, 0])))
        take[n] = clicked_region(new_fg[n], old_fg[n], click, bool(positive[n]), bounds)
    mask = torch.from_numpy(take).to(new_logits.device)[:, None]
    return torch.where(mask, new_logits, old_logits)


def grown_bounds(box_xyxy: np.ndarray, shape_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) grid window of ``box_xyxy`` grown by ``BOX_GROWTH`` of its larger side, clipped."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    pad = BOX_GROWTH * max(x1 - x0, y1 - y0, 1.0)
    h, w = shape_hw
    return (max(0, int(np.floor(y0 - pad))), min(h, int(np.ceil(y1 + pad))),
            max(0, int(np.floor(x0 - pad))), min(w, int(np.ceil(x1 + pad))))


@dataclass(frozen=True)
class ClickFix:
    """The native click fix: after the update, a click whose pixel still has the wrong label
    moves the mask's threshold locally (see :func:`fix_clicked_pixels`).

    reach: the disc's radius in click depths (native px from the clicked pixel to the nearest
    pixel of the click's label), plus one pixel; max_radius: its bound, a share of the object's
    longer box side; margin: logits this far past the clicked pixel's own still join it.
    The defaults (reach 3, max_radius 0.5, margin 0) were chosen on 30 DSB *training* nuclei
    with ``hrmedseg_sam_default`` and LiteMedSAM (docs/benchmarks.md, "The pixel click update").

    fade: instead of the disc of click depths, the threshold shift fades from the clicked pixel
    (the full shift to its logit) to none at ``max_radius`` box sides, as ``(1 - d / r) **
    fade_power`` at distance d: a click moves the boundary most where it was made and less
    along the way (``reach`` unused; powers below 1 keep more of the shift farther out).
    """

    reach: float = 3.0
    max_radius: float = 0.5
    margin: float = 0.0
    fade: bool = False
    fade_power: float = 1.0

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str = "click fix") -> "ClickFix":
        """A model's click fix record (``ModelMetadata.click_fix``: these fields, and optionally a
        ``provenance``) -> ClickFix; anything else is a WeightsError naming ``source``."""
        fields = {k: v for k, v in record.items() if k != "provenance"}
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise WeightsError(f"{source}: unknown click fix settings {sorted(unknown)}")
        try:
            fix = cls(**{k: (bool(v) if k == "fade" else float(v)) for k, v in fields.items()})
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{source}: not a click fix ({e})") from e
        if min(fix.max_radius, fix.reach, fix.fade_power) <= 0:
            raise WeightsError(f"{source}: reach, max_radius and fade_power must be positive, got {fix.reach}, {fix.max_radius}, {fix.fade_power}")
        return fix


def fix_clicked_pixels(
    mask: np.ndarray,
    region: tuple[int, int, int, int],
    logits_at: Callable[[tuple[int, int, int, int]], np.ndarray],
    clicks_xy: np.ndarray,
    labels: np.ndarray,
    box_side: float,
    fix: ClickFix,
) -> np.ndarray:
    """(H, W) bool: ``mask`` (of native ``region`` y0, y1, x0, x1) with every click's pixel given
    its label, clicks in order (a later click wins).

    A positive click on a background pixel p adds the pixels connected to p whose logit is at
    least logit(p) - margin, within a disc around p (radius ``fix.reach`` click depths + 1,
    at most ``fix.max_radius * box_side``); a negative click on a foreground pixel removes those
    with logit at most logit(p) + margin. That is the mask's own threshold lowered (raised) to
    the clicked pixel's logit, near the click only: the clicked pixel always flips, no pixel
    farther than the disc changes, and the result depends on the logits and clicks alone.
    ``logits_at(window)``: the (h, w) native logits, less the mask threshold, of an absolute
    native window (y0, y1, x0, x1): the mask is where they are > 0; clicks_xy (P, 2) native xy; labels (P,) 1 / 0. Clicks
    outside the region are left alone (no pixel there to set).
    """
    from scipy import ndimage

    out = mask.copy()
    ry0, ry1, rx0, rx1 = region
    cap = max(fix.max_radius * float(box_side), 2.0)
    half = int(np.ceil(cap)) + 1
    for (x, y), label in zip(np.asarray(clicks_xy, np.float64), np.asarray(labels)):
        py, px = int(np.floor(y)), int(np.floor(x))
        want = bool(label == 1)
        if not (ry0 <= py < ry1 and rx0 <= px < rx1) or out[py - ry0, px - rx0] == want:
            continue
        wy0, wy1, wx0, wx1 = max(ry0, py - half), min(ry1, py + half + 1), max(rx0, px - half), min(rx1, px + half + 1)
        view = out[wy0 - ry0 : wy1 - ry0, wx0 - rx0 : wx1 - rx0]
        cy, cx = py - wy0, px - wx0
        yy, xx = np.ogrid[: view.shape[0], : view.shape[1]]
        squared = (yy - cy) ** 2 + (xx - cx) ** 2
        logits = logits_at((wy0, wy1, wx0, wx1))
        level = logits[cy, cx] + (-fix.margin if want else fix.margin)
        if fix.fade:
            radius = cap
            level = level * np.clip(1.0 - np.sqrt(squared) / cap, 0.0, 1.0) ** fix.fade_power  # none left at the cap
        else:
            has_label = view == want
            depth = float(ndimage.distance_transform_edt(~has_label)[cy, cx]) if has_label.any() else cap
            radius = min(fix.reach * depth + 1.0, cap)
        joins = (logits >= level) if want else (logits <= level)
        joins &= squared <= radius**2
        joins[cy, cx] = True
        parts, _ = ndimage.label(joins, structure=np.ones((3, 3), bool))
        view[parts == parts[cy, cx]] = want
    return out


__all__ = ["BOX_GROWTH", "CLICK_UPDATES", "REACH", "ClickFix", "check_click_update", "clicked_region", "fix_clicked_pixels",
           "grown_bounds", "local_click_update"]
