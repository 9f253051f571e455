"""Segment every object of an image without boxes: proposals, then the box model for each.

    from hrmedseg.engine import BoxPredictor
    predictor = BoxPredictor("hrmedseg_sam_default")
    labels, records = predictor.segment_auto("slide.ome.tif")          # nuclei proposer by default

Two stages:

1. **Proposals** (boxes, xyxy native pixels), tile by tile so that memory stays bounded:
   - ``proposer="nuclei"`` (or any prompt-free HRMedSeg model / :class:`SemanticPredictor`):
     the prompt-free model's foreground on the tile (its probabilities averaged over
     ``flips`` mirrored views of the tile), its small holes filled, split into
     instances by a distance-transform watershed (touching nuclei become separate objects),
     pieces joined again where the neck between them is wide (one large nucleus stays whole);
   - ``proposer="grid"`` (any SAM box model, no prompt-free model needed): a grid of point
     prompts per crop, filtered by predicted IoU and stability and de-duplicated by box NMS, as
     segment_anything's ``SamAutomaticMaskGenerator`` does (its ``amg`` helpers are reused).
2. **Masks**: each proposal's box goes through :meth:`BoxPredictor.predict_boxes` (a crop around
   the box at the box model's scale). For a prompt-free proposal the box model's mask is clipped
   to the proposal's zone (the pixels nearer to it than to any other proposal, so a box that
   also covers a touching neighbour cannot take it) and kept only when it agrees with the
   proposal's own mask (IoU >= ``agree_iou``); otherwise the proposal's mask is the object's.
   The box model draws touching nuclei worse than the watershed split separates them (see the
   "Segment every object" section of docs/benchmarks.md, where ``agree_iou`` and ``box_pad``
   were chosen on training images). The masks go into a :class:`SparseLabels` or any label array.

No seams: a tile is read with a ``halo`` of context on every side, and an object belongs to the
one tile that holds its box centre, so an object cut by a tile border is proposed once, from a
window that holds it whole (when it is smaller than the halo); its final mask comes from a crop
around its own box, not from the tile. Proposals of neighbouring tiles that still overlap (an
object larger than the halo) are merged by box NMS over the whole image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ..errors import InputError
from ..io.readers import LazyImage, open_image
from .crops import Crop
from .labels import ObjectMask
from .semantic import Cancelled, SemanticPredictor, tile_starts

if TYPE_CHECKING:
    from .predictor import BoxPredictor

log = logging.getLogger(__name__)

PROPOSERS = ("nuclei", "grid")
# Chosen on nuc_sel (57 DSB training images no training run saw) with the shipped nuclei proposer,
# among values that keep the box model in the loop (<= 1): 0.9 (docs/benchmarks.md, "More training
# for the prompt-free nuclei model"). 0.7 was chosen with the proposer of 2026-12-05.
AGREE_IOU = 0.9
# Test-time flips of the prompt-free model: views per count, as (flip rows, flip columns).
FLIP_VIEWS: dict[int, tuple[tuple[bool, bool], ...]] = {
    1: ((False, False),),
    2: ((False, False), (False, True)),
    4: ((False, False), (False, True), (True, False), (True, True)),
}
# 2 (the window and its left-right mirror): on DSB training images (not is_val), proposals alone,
# pooled F1 +0.016 dark / +0.013 light (54 images), +0.014 on 18 more dark ones; 3 or 4 views
# did no better on light images for 1.5-2x the model calls (docs/benchmarks.md, "Size-normalised proposals").
# Held-out (one run, 70 images): +0.004 pooled F1 for segment_auto, +0.007 for the proposals alone.
FLIPS_DEFAULT = 2


@dataclass(frozen=True)
class ProposalMask:
    """A prompt-free proposal's own pixels, to check the box model's mask against.

    region: (y0, y1, x0, x1) native px around its padded box. code: uint8 (h, w) of the region:
    2 = the proposal's pixels, 1 = the rest of its zone (pixels nearer to it than to any other
    proposal of its window), 0 = nearer to another proposal.
    """

    region: tuple[int, int, int, int]
    code: np.ndarray

    def choose(self, obj: ObjectMask, agree_iou: float) -> ObjectMask:
        """``obj`` (the box model's result for this proposal's box) with its final mask over ``region``:
        the box model's mask inside the zone when its IoU with the proposal is >= ``agree_iou``,
        else the proposal's own mask."""
        y0, y1, x0, x1 = self.region
        oy0, oy1, ox0, ox1 = obj.region
        drawn = np.zeros(self.code.shape, bool)
        iy0, iy1, ix0, ix1 = max(y0, oy0), min(y1, oy1), max(x0, ox0), min(x1, ox1)
        if iy0 < iy1 and ix0 < ix1:
            drawn[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = obj.mask[iy0 - oy0 : iy1 - oy0, ix0 - ox0 : ix1 - ox0]
        drawn &= self.code > 0
        own = self.code == 2
        iou = (drawn & own).sum() / max(int((drawn | own).sum()), 1)
        return replace(obj, region=self.region, mask=drawn if iou >= agree_iou else own)


@dataclass(frozen=True)
class AutoOptions:
    """Settings of :func:`segment_auto`.

    tile: native side of a proposal tile (its pixels are read in one piece, plus the halo).
    halo: native context read around each tile; objects up to this size are never cut.
    min_area: proposals with fewer native pixels are dropped (fragments, not objects).
    threshold: foreground probability of the prompt-free proposer.
    split_distance: smallest distance (native px) between the centres of two touching objects
        the watershed split keeps apart (about a small nucleus's radius). 6, with ``neck_ratio``
        joining the wrongly cut pieces again (8 before; chosen on DSB training images, see
        docs/benchmarks.md, "Segment every object").
    neck_ratio: two touching watershed pieces are one object again when the neck between them
        is at least this fraction of the narrower piece's half-width (:func:`merge_wide_necks`):
        touching round nuclei meet at a narrow waist, one large or irregular nucleus cut by the
        watershed does not. Above 1: no joining (the plain watershed, the behaviour before).
    max_hole_area: enclosed background holes of the prompt-free foreground up to this many
        native px are filled before the split (0: none). Why: on stained tissue the model
        leaves holes in large textured nuclei, and the watershed cuts a nucleus around each
        hole; the bound keeps background enclosed by a ring of nuclei (larger) unfilled.
    box_pad: native pixels added around each proposal's box before the box model sees it. 0:
        the box model was trained on tight boxes; on 12 DSB training images a 2 px pad cut
        the box masks' F1 from 0.85 to 0.75 (small nuclei: 2 px is a large part of the box).
    points_per_side, pred_iou_thresh, stability_score_thresh, points_batch: grid proposer,
        as ``SamAutomaticMaskGenerator``'s arguments of the same names.
    nms_iou: box IoU above which two proposals are one object.
    agree_iou: a prompt-free proposal keeps the box model's mask (clipped to its zone) only when
        that mask's IoU with the proposal's own mask is at least this; 0 always keeps the box
        model's mask, above 1 never (the proposals alone).
    flips: test-time flips of the prompt-free model: its foreground probability is the mean
        over this many views of each window (:data:`FLIP_VIEWS`: 1 = the window as it is,
        2 = also mirrored left-right, 4 = also up-down and both), each view's probabilities
        flipped back before the mean. FLIPS_DEFAULT, chosen on DSB training images (see
        docs/benchmarks.md, "Size-normalised proposals"); each view is one more model call.
        A proposer without ``predict_logits`` (a stub with ``segment`` only) ignores it.
    """

    tile: int = 2048
    halo: int = 128
    min_area: int = 16
    threshold: float = 0.5
    split_distance: int = 6
    neck_ratio: float = 0.9
    max_hole_area: int = 1024
    box_pad: float = 0.0
    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    points_batch: int = 64
    nms_iou: float = 0.7
    agree_iou: float = AGREE_IOU
    flips: int = FLIPS_DEFAULT

    def __post_init__(self) -> None:
        if self.flips not in FLIP_VIEWS:
            raise InputError(f"flips must be one of {', '.join(map(str, sorted(FLIP_VIEWS)))} (got {self.flips})")
        if self.tile < 64 or self.halo < 0 or self.halo >= self.tile:
            raise InputError(f"auto tiles need tile >= 64 and 0 <= halo < tile (got tile {self.tile}, halo {self.halo})")


def tiles(shape_yx: tuple[int, int], tile: int) -> Iterator[tuple[int, int, int, int]]:
    """Disjoint (y0, y1, x0, x1) tiles of ``tile`` native pixels covering the image, raster order."""
    h, w = shape_yx
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            yield y0, min(y0 + tile, h), x0, min(x0 + tile, w)


def starts_within(core: tuple[int, int, int, int], within: tuple[int, int, int, int] | None) -> bool:
    """Whether a tile or crop whose owned part is ``core`` (y0, y1, x0, x1) belongs to the cell
    ``within`` (y0, y1, x0, x1; None: the whole image): its top-left corner lies in the cell, so
    the cells of a partition of the image share out its tiles, each tile to one cell."""
    if within is None:
        return True
    y0, y1, x0, x1 = within
    return y0 <= core[0] < y1 and x0 <= core[2] < x1


def owned(boxes: np.ndarray, core: tuple[int, int, int, int]) -> np.ndarray:
    """(N,) bool: boxes (N, 4) xyxy whose centre lies in ``core`` (y0, y1, x0, x1), half-open."""
    y0, y1, x0, x1 = core
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


def split_instances(foreground: np.ndarray, min_distance: int, neck_ratio: float = 2.0) -> np.ndarray:
    """(h, w) bool -> int32 instances: distance-transform watershed of each connected blob.

    Markers are the maxima of the distance to the background at least ``min_distance`` apart,
    so two touching round objects become two labels and a lone one stays whole. Pieces whose
    neck is wide are then joined again (:func:`merge_wide_necks` with ``neck_ratio``; above 1:
    never, the plain watershed).
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    blobs, n = ndimage.label(foreground, structure=np.ones((3, 3), bool), output=np.int32)
    if n == 0:
        return blobs
    distance = ndimage.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=max(1, int(min_distance)), labels=blobs, exclude_border=False)
    markers = np.zeros(foreground.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # A blob without a peak (flat, thin) is its own marker, so it keeps a label.
    unmarked = np.isin(blobs, np.setdiff1d(np.arange(1, n + 1), blobs[markers > 0]))
    markers[unmarked] = blobs[unmarked] + len(peaks)
    pieces = watershed(-distance, markers, mask=foreground).astype(np.int32)
    return merge_wide_necks(pieces, distance, neck_ratio) if neck_ratio <= 1 else pieces


def neck_widths(pieces: np.ndarray, distance: np.ndarray) -> dict[tuple[int, int], float]:
    """{(a, b): neck} for every pair of 4-adjacent pieces a < b of ``pieces`` (h, w) int: the
    largest distance to the background (``distance``, (h, w)) along their shared border, taken
    as the smaller of the two sides' values (a neck's half-width, in px)."""
    necks: dict[tuple[int, int], float] = {}
    n = int(pieces.max())
    for a, b, da, db in ((pieces[:, :-1], pieces[:, 1:], distance[:, :-1], distance[:, 1:]),
                         (pieces[:-1], pieces[1:], distance[:-1], distance[1:])):
        border = (a > 0) & (b > 0) & (a != b)
        if not border.any():
            continue
        lo, hi = np.minimum(a[border], b[border]).astype(np.int64), np.maximum(a[border], b[border]).astype(np.int64)
        width = np.minimum(da[border], db[border])
        key = lo * (n + 1) + hi
        order = np.argsort(key, kind="stable")
        key, width = key[order], width[order]
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        for k, w in zip(key[first], np.maximum.reduceat(width, first)):
            pair = (int(k // (n + 1)), int(k % (n + 1)))
            necks[pair] = max(necks.get(pair, 0.0), float(w))
    return necks


def merge_wide_necks(pieces: np.ndarray, distance: np.ndarray, neck_ratio: float) -> np.ndarray:
    """``pieces`` (h, w) int32 with touching pieces joined where the neck between them is wide:
    neck (see :func:`neck_widths`) >= ``neck_ratio`` x the smaller of the two pieces' largest
    distance to the background (their half-widths).

    Why: two touching round nuclei meet at a narrow waist (neck well below either radius), but
    a large or irregular nucleus has several distance maxima ``min_distance`` apart joined by
    wide necks, and the plain watershed cuts it (the over-splitting of large stained nuclei,
    docs/benchmarks.md, "Segment every object"). The ratio is scale-free, unlike h-maxima
    depths. Widest relative necks are joined first; a joined group's half-width is its largest.
    """
    from scipy import ndimage

    n = int(pieces.max())
    if n < 2:
        return pieces
    half_width = np.zeros(n + 1)
    half_width[1:] = ndimage.maximum(distance, pieces, np.arange(1, n + 1))
    parent = np.arange(n + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    necks = neck_widths(pieces, distance)
    for (a, b), neck in sorted(necks.items(), key=lambda kv: -kv[1] / max(min(half_width[kv[0][0]], half_width[kv[0][1]]), 1e-9)):
        ra, rb = root(a), root(b)
        if ra != rb and neck >= neck_ratio * min(half_width[ra], half_width[rb]):
            parent[rb] = ra
            half_width[ra] = max(half_width[ra], half_width[rb])
    return np.array([root(i) for i in range(n + 1)], np.int32)[pieces]


def drop_small(instances: np.ndarray, min_area: int) -> np.ndarray:
    """``instances`` (h, w) int with the labels of fewer than ``min_area`` pixels set to 0 (ids kept)."""
    areas = np.bincount(instances.ravel())
    small = areas < min_area
    small[0] = False
    return np.where(small[instances], 0, instances)


def fill_small_holes(foreground: np.ndarray, max_hole_area: int) -> np.ndarray:
    """(h, w) bool with its enclosed background holes of at most ``max_hole_area`` px filled (0: none)."""
    from scipy import ndimage

    if max_hole_area <= 0:
        return foreground
    holes, n = ndimage.label(ndimage.binary_fill_holes(foreground) & ~foreground)
    if n == 0:
        return foreground
    small = np.bincount(holes.ravel()) <= max_hole_area
    small[0] = False
    return foreground | small[holes]


def flipped(array: np.ndarray, rows: bool, cols: bool) -> np.ndarray:
    """``array`` (h, w, ...) mirrored up-down (``rows``) and/or left-right (``cols``); its own inverse."""
    if rows:
        array = array[::-1]
    if cols:
        array = array[:, ::-1]
    return array


def flip_averaged_probability(predict_logits: Callable[[np.ndarray], np.ndarray], rgb: np.ndarray, flips: int) -> np.ndarray:
    """(h, w) float32 foreground probability of ``rgb`` (h, w, 3): the mean over the
    :data:`FLIP_VIEWS` of ``flips`` of the sigmoid of ``predict_logits(view)[0]`` ((C2, h, w)
    logits of one class), each flipped back to ``rgb``'s orientation first.

    Why: the model's errors are not mirror-symmetric (its padding sits on the bottom-right of
    a window, and a nucleus's position in the window changes with the view), so the mean of a
    view and its mirror cancels part of them; it helped on DSB training images (docs/benchmarks.md,
    "Size-normalised proposals"; why exactly was not analysed).
    """
    total = np.zeros(rgb.shape[:2], np.float32)
    for rows, cols in FLIP_VIEWS[flips]:
        view = np.ascontiguousarray(flipped(rgb, rows, cols))
        logits = np.asarray(predict_logits(view)[0], np.float32)
        total += flipped(1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0))), rows, cols)
    return total / len(FLIP_VIEWS[flips])


def semantic_foreground(semantic: Any, rgb: np.ndarray, options: "AutoOptions") -> np.ndarray:
    """(h, w) bool prompt-free foreground of ``rgb`` (h, w, 3) uint8: probability >
    ``options.threshold``, averaged over ``options.flips`` views when the proposer has
    ``predict_logits`` (a :class:`SemanticPredictor`); one view is ``semantic.segment`` as before."""
    if options.flips == 1 or not hasattr(semantic, "predict_logits"):
        return semantic.segment(rgb, threshold=options.threshold) > 0
    return flip_averaged_probability(semantic.predict_logits, rgb, options.flips) > options.threshold


def proposal_instances(foreground: np.ndarray, options: "AutoOptions") -> np.ndarray:
    """(h, w) bool prompt-free foreground -> int32 instances: small holes filled, watershed split
    (wide necks joined again), fragments dropped."""
    foreground = fill_small_holes(foreground, options.max_hole_area)
    pieces = split_instances(foreground, options.split_distance, options.neck_ratio)
    return drop_small(pieces, options.min_area).astype(np.int32)


def zones(instances: np.ndarray) -> np.ndarray:
    """(h, w) int32: every pixel labelled with the instance nearest to it (Euclidean), its zone of influence."""
    from scipy import ndimage

    if not instances.any():
        return np.zeros_like(instances)
    nearest = ndimage.distance_transform_edt(instances == 0, return_distances=False, return_indices=True)
    return instances[tuple(nearest)]


def proposal_masks(instances: np.ndarray, boxes: np.ndarray, ids: np.ndarray, pad: float, origin: tuple[int, int]) -> list[ProposalMask]:
    """A :class:`ProposalMask` per instance ``ids[i]`` (window labels) over its box ``boxes[i]``
    (xyxy native) grown by ``pad``, clipped to the window at ``origin`` (y0, x0)."""
    zone = zones(instances)
    h, w = instances.shape
    oy, ox = origin
    out = []
    for (bx0, by0, bx1, by1), i in zip(boxes, ids):
        y0, x0 = max(0, math.floor(by0 - pad) - oy), max(0, math.floor(bx0 - pad) - ox)
        y1, x1 = min(h, math.ceil(by1 + pad) - oy), min(w, math.ceil(bx1 + pad) - ox)
        code = np.where(instances[y0:y1, x0:x1] == i, 2, (zone[y0:y1, x0:x1] == i).astype(np.uint8)).astype(np.uint8)
        out.append(ProposalMask((y0 + oy, y1 + oy, x0 + ox, x1 + ox), code))
    return out


def instance_boxes(instances: np.ndarray, min_area: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(N, 4) xyxy boxes (native px, ``origin`` = the window's (y0, x0)) of labels with >= ``min_area`` px."""
    from scipy import ndimage

    slices = ndimage.find_objects(instances)
    areas = np.bincount(instances.ravel(), minlength=len(slices) + 1)
    oy, ox = origin
    out = [
        (s[1].start + ox, s[0].start + oy, s[1].stop + ox, s[0].stop + oy)
        for i, s in enumerate(slices, start=1)
        if s is not None and areas[i] >= min_area
    ]
    return np.asarray(out, np.float64).reshape(-1, 4)


#: Below this many boxes torchvision's NMS runs on all of them (its all-pairs cost is small there).
NMS_DIRECT_BELOW = 4096


def nms_boxes(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices of ``boxes`` (N, 4) xyxy kept by torchvision's greedy box NMS at ``iou``, highest score first.

    torchvision compares every box with every other (170k objects of a 40000^2 slide: 40-136 s on
    2 cores, bench/bench_auto_merge.py), but a box can only suppress one it overlaps: boxes with
    no partner above ``iou`` are kept as they are, and torchvision runs on the others only
    (:func:`boxes_with_overlap`). The kept set is the same; of two boxes with equal (float32)
    scores the one with the lower index counts as higher.
    """
    import torchvision

    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    # torchvision sorts float32 scores and breaks ties its own way; ranks make the order (score,
    # then index) explicit, so a subset gives the same decisions as the whole set.
    order = np.lexsort((np.arange(len(boxes)), -np.asarray(scores, np.float32)))
    rank = np.empty(len(boxes), np.int64)
    rank[order] = np.arange(len(boxes))
    check = boxes_with_overlap(boxes, iou) if len(boxes) >= NMS_DIRECT_BELOW else np.arange(len(boxes))
    free = np.setdiff1d(np.arange(len(boxes)), check)
    kept = torchvision.ops.nms(torch.as_tensor(boxes[check], dtype=torch.float32),
                               torch.as_tensor(-rank[check], dtype=torch.float32), iou).numpy()  # exact below 2**24 boxes
    keep = np.concatenate([free, check[kept]])
    return keep[np.argsort(rank[keep])]


def boxes_with_overlap(boxes: np.ndarray, iou: float, max_entries_per_box: int = 64) -> np.ndarray:
    """Sorted indices of the boxes (N, 4) xyxy whose IoU with some other box exceeds ``iou``.

    Boxes are hashed into square bins of twice the median box side; two boxes can only overlap if
    they share a bin, so only those pairs are compared. Where the boxes are so large or so uneven
    that this would not save work (more than ``max_entries_per_box`` bins per box), every box is
    returned.
    """
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cell = max(16.0, 2.0 * float(np.median(side)))
    lo, hi = np.floor(boxes[:, :2] / cell).astype(np.int64), np.floor(boxes[:, 2:] / cell).astype(np.int64)
    span = hi - lo + 1  # (N, 2) bins covered along x and y
    counts = span[:, 0] * span[:, 1]
    if counts.sum() > max_entries_per_box * len(boxes):
        return np.arange(len(boxes))
    owner = np.repeat(np.arange(len(boxes)), counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    bx = lo[owner, 0] + offset % span[owner, 0]
    by = lo[owner, 1] + offset // span[owner, 0]
    key = by * (int(hi[:, 0].max()) + 2) + bx
    order = np.argsort(key, kind="stable")
    key, owner = key[order], owner[order]
    flagged = np.zeros(len(boxes), bool)
    for k in range(1, len(key)):  # pairs k apart within a bin; ends at the largest bin's size
        same = key[k:] == key[:-k]
        if not same.any():
            break
        a, b = owner[:-k][same], owner[k:][same]
        over = pair_iou(boxes[a], boxes[b]) > iou
        flagged[a[over]] = flagged[b[over]] = True
    return np.flatnonzero(flagged)


def pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of the rows of ``a`` and ``b`` (M, 4) xyxy, pairwise (M,)."""
    w = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(0)
    h = (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(0)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def _window(image: LazyImage, core: tuple[int, int, int, int], halo: int) -> tuple[int, int, int, int]:
    h, w = image.shape_yx
    y0, y1, x0, x1 = core
    return max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)


def propose_semantic(
    image: LazyImage,
    semantic: Any,
    scaling_apply: Callable[[np.ndarray], np.ndarray],
    options: AutoOptions,
    cancel: Any = None,
    within: tuple[int, int, int, int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[ProposalMask]]]:
    """Per tile: (boxes (N, 4) xyxy native, scores (N,) = box area, N proposal masks) of the objects it owns.

    Each tile's window (tile + halo) is mapped to 0..255 with the whole image's intensity map
    (``scaling_apply``, so tiles agree) and segmented by the prompt-free model. ``within``: only
    the tiles that start in this cell (see :func:`starts_within`).
    """
    for core in tiles(image.shape_yx, options.tile):
        if not starts_within(core, within):
            continue
        if cancel is not None and cancel.is_set():
            raise Cancelled("auto segmentation cancelled")
        wy0, wy1, wx0, wx1 = _window(image, core, options.halo)
        rgb = np.clip(np.rint(scaling_apply(image.read(wy0, wy1, wx0, wx1))), 0, 255).astype(np.uint8)
        foreground = semantic_foreground(semantic, rgb, options)
        instances = proposal_instances(foreground, options)
        boxes = instance_boxes(instances, options.min_area, (wy0, wx0))
        ids = np.unique(instances[instances > 0])  # instance_boxes' order: the labels left, ascending
        keep = owned(boxes, core)
        boxes, ids = boxes[keep], ids[keep]
        masks = proposal_masks(instances, boxes, ids, options.box_pad, (wy0, wx0))
        yield boxes, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), masks


def grid_points_masks(predictor: "BoxPredictor", image: LazyImage, crop: Crop, options: AutoOptions) -> tuple[np.ndarray, np.ndarray]:
    """SAM's automatic mask generator on one crop: (boxes (N, 4) xyxy native, predicted IoU (N,)).

    A ``points_per_side``² grid over the crop's valid pixels, three masks per point, kept when
    predicted IoU >= ``pred_iou_thresh`` and stability >= ``stability_score_thresh``, then box
    NMS; only the kept masks' boxes are returned (the box model makes the final masks).
    """
    from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score

    from ..models.prompting import decode_sam_points
    from .decoder import is_sam2_model

    model = predictor.model
    if is_sam2_model(model):
        raise InputError("the grid proposer needs a SAM-family box model; for SAM2 models use proposer='nuclei' or a prompt-free model")
    emb, _ = predictor.embedding(image, crop)
    h_in, w_in = crop.valid_input_shape(image.shape_yx)
    grid = build_point_grid(options.points_per_side) * np.array([w_in, h_in])
    boxes, scores = [], []
    with torch.inference_mode():
        for start in range(0, len(grid), options.points_batch):
            pts = torch.as_tensor(grid[start : start + options.points_batch], dtype=torch.float32, device=predictor.device)
            logits, iou = decode_sam_points(model.prompt_encoder, model.mask_decoder, emb, pts)
            predictor.decoder_calls += 1
            logits, iou = logits.flatten(0, 1), iou.flatten()
            stable = calculate_stability_score(logits, predictor.mask_threshold, 1.0)
            masks = logits > predictor.mask_threshold
            keep = (iou >= options.pred_iou_thresh) & (stable >= options.stability_score_thresh) & masks.flatten(1).any(1)
            if keep.any():
                masks = masks[keep]
                # low-res (S/4) boxes -> input px; drop masks that are padding or the whole crop
                b = batched_mask_to_box(masks).float() * (crop.input_size / logits.shape[-1])
                b[:, 2:] += crop.input_size / logits.shape[-1]
                boxes.append(b.cpu().numpy())
                scores.append(iou[keep].float().cpu().numpy())
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0)
    b, s = np.concatenate(boxes), np.concatenate(scores)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w_in)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h_in)
    whole = ((b[:, 2] - b[:, 0]) >= 0.95 * w_in) & ((b[:, 3] - b[:, 1]) >= 0.95 * h_in)
    b, s = b[~whole], s[~whole]
    keep = nms_boxes(b, s, options.nms_iou)
    return crop.input_to_native(b[keep]), s[keep]


def propose_grid(
    predictor: "BoxPredictor",
    image: LazyImage,
    options: AutoOptions,
    cancel: Any = None,
    within: tuple[int, int, int, int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[None]]]:
    """Per crop of the model's input size (scale 1, ``halo`` overlap): the grid proposals it owns
    (boxes, predicted IoU, no proposal masks: the box model's masks are the objects'). ``within``:
    only the crops whose owned part starts in this cell (see :func:`starts_within`)."""
    size = predictor.policy.input_size
    h, w = image.shape_yx
    overlap = min(options.halo, size // 2 - 1)
    ys, xs = tile_starts(h, size, overlap), tile_starts(w, size, overlap)
    # A crop owns the middle of its overlaps with its neighbours.
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            cy0 = 0 if iy == 0 else (y0 + ys[iy - 1] + size) // 2
            cy1 = h if iy == len(ys) - 1 else (ys[iy + 1] + y0 + size) // 2
            cx0 = 0 if ix == 0 else (x0 + xs[ix - 1] + size) // 2
            cx1 = w if ix == len(xs) - 1 else (xs[ix + 1] + x0 + size) // 2
            if not starts_within((cy0, cy1, cx0, cx1), within):
                continue
            if cancel is not None and cancel.is_set():
                raise Cancelled("auto segmentation cancelled")
            crop = Crop(1.0, y0, x0, size, size)
            boxes, scores = grid_points_masks(predictor, image, crop, options)
            keep = owned(boxes, (cy0, cy1, cx0, cx1)) if len(boxes) else np.zeros(0, bool)
            yield boxes[keep], scores[keep], [None] * int(keep.sum())


def resolve_proposer(proposer: Any, device: Any) -> SemanticPredictor | str:
    """``"grid"``, or the prompt-free predictor for ``"nuclei"`` or a model name/path; anything with
    ``segment(rgb, threshold)`` (a :class:`SemanticPredictor`) is used as it is."""
    if hasattr(proposer, "segment") or proposer == "grid":
        return proposer
    if proposer == "nuclei":
        from ..defaults import DEFAULT_PROMPT_FREE_MODELS

        proposer = DEFAULT_PROMPT_FREE_MODELS["nuclei"]
    semantic = SemanticPredictor(proposer, device=device)
    if semantic.num_classes != 1:
        raise InputError(f"proposer {proposer}: a prompt-free model with one class is needed (it has {semantic.num_classes})")
    return semantic


def cell_proposals(
    predictor: "BoxPredictor",
    image: LazyImage,
    proposer: Any = "nuclei",
    options: AutoOptions | None = None,
    cancel: Any = None,
    within: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[ProposalMask | None]]:
    """The proposals of the tiles that start in ``within`` (None: every tile), after box NMS:
    (boxes (N, 4) xyxy native, unpadded; scores (N,), the NMS order; N proposal masks)."""
    options = options or AutoOptions()
    source = resolve_proposer(proposer, predictor.device)
    parts = list(
        propose_grid(predictor, image, options, cancel, within)
        if source == "grid"
        else propose_semantic(image, source, predictor.scaling(image).apply, options, cancel, within)
    )
    if not parts:  # a cell that starts no tile
        return np.zeros((0, 4)), np.zeros(0), []
    boxes, scores, masks = zip(*parts)
    b, s = np.concatenate(boxes).reshape(-1, 4), np.concatenate(scores)
    masks = [m for part in masks for m in part]
    keep = nms_boxes(b, s, options.nms_iou)
    return b[keep], s[keep], [masks[k] for k in keep]


def padded_raster_order(boxes: np.ndarray, shape_yx: tuple[int, int], pad: float) -> tuple[np.ndarray, np.ndarray]:
    """``(padded boxes (N, 4), order)``: each xyxy box grown by ``pad`` and clipped to the image,
    and the raster order (top edge, then left edge) in which objects are numbered and pasted."""
    h, w = shape_yx
    b = np.stack([(boxes[:, 0] - pad).clip(0, w), (boxes[:, 1] - pad).clip(0, h),
                  (boxes[:, 2] + pad).clip(0, w), (boxes[:, 3] + pad).clip(0, h)], 1).reshape(-1, 4)
    return b, np.lexsort((b[:, 0], b[:, 1]))


def propose_objects(
    predictor: "BoxPredictor",
    image: Any,
    proposer: Any = "nuclei",
    options: AutoOptions | None = None,
    cancel: Any = None,
    within: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, list[ProposalMask | None]]:
    """Every object the proposer finds (in the tiles starting in ``within``; None: all), raster
    order: (boxes (N, 4) xyxy native padded by ``box_pad``, N proposal masks: a
    :class:`ProposalMask` for prompt-free proposals, None for the grid's)."""
    options = options or AutoOptions()
    image = open_image(image)
    boxes, _, masks = cell_proposals(predictor, image, proposer, options, cancel, within)
    padded, order = padded_raster_order(boxes, image.shape_yx, options.box_pad)
    return padded[order], [masks[k] for k in order]


def propose(
    predictor: "BoxPredictor", image: Any, proposer: Any = "nuclei", options: AutoOptions | None = None, cancel: Any = None
) -> np.ndarray:
    """(N, 4) xyxy native boxes of every object the proposer finds, padded by ``box_pad``, raster order."""
    return propose_objects(predictor, image, proposer, options, cancel)[0]


def auto_objects(
    predictor: "BoxPredictor",
    image: Any,
    proposer: Any = "nuclei",
    options: AutoOptions | None = None,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
    within: tuple[int, int, int, int] | None = None,
) -> Iterator[ObjectMask]:
    """Every object of ``image`` (proposed by the tiles starting in ``within``; None: all) as an
    :class:`ObjectMask` (``box``: its padded proposal box), in raster order of the boxes: the box
    model's mask or the proposal's (see the module docstring)."""
    options = options or AutoOptions()
    image = open_image(image)
    boxes, masks = propose_objects(predictor, image, proposer, options, cancel, within)
    log.info("auto: %d proposals on %s", len(boxes), image.name)
    yield from final_masks(predictor, image, boxes, masks, options, progress, cancel)


def final_masks(
    predictor: "BoxPredictor",
    image: LazyImage,
    boxes: np.ndarray,
    masks: list[ProposalMask | None],
    options: AutoOptions,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
) -> Iterator[ObjectMask]:
    """The box model's mask of each proposal box (N, 4), or the proposal's own (:meth:`ProposalMask.choose`), in box order."""
    yield from chosen_masks(predictor.predict_boxes(image, boxes, progress=progress, cancel=cancel), masks, options.agree_iou)


def chosen_masks(objects: Iterable[ObjectMask], masks: list[ProposalMask | None], agree_iou: float) -> Iterator[ObjectMask]:
    """Each box-model object, or its proposal's own mask where they disagree (:meth:`ProposalMask.choose`);
    ``masks[obj.box_index]`` is the object's proposal (None: keep the object)."""
    for obj in objects:
        proposal = masks[obj.box_index]
        yield obj if proposal is None else proposal.choose(obj, agree_iou)


def segment_auto(
    predictor: "BoxPredictor",
    image: Any,
    proposer: Any = "nuclei",
    labels: Any = None,
    options: AutoOptions | None = None,
    first_id: int = 1,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
) -> tuple[Any, list]:
    """Every object of ``image``: (labels, per-object records; each record's ``box`` is its proposal).

    See the module docstring; ``labels`` as in :meth:`BoxPredictor.segment` (a
    :class:`SparseLabels` keeps memory bounded on slides). Overlaps: the first object keeps its
    pixels (``keep_existing``), so a mask never eats into a neighbour already drawn.
    """
    from .predictor import paste_objects

    image = open_image(image)
    objects = auto_objects(predictor, image, proposer, options, progress, cancel)
    return paste_objects(objects, image.shape_yx, labels, first_id, overlap="keep_existing")


__all__ = ["AGREE_IOU", "AutoOptions", "chosen_masks", "FLIPS_DEFAULT", "FLIP_VIEWS", "PROPOSERS", "ProposalMask", "auto_objects",
           "boxes_with_overlap", "cell_proposals", "final_masks", "flip_averaged_probability", "nms_boxes", "semantic_foreground",
           "fill_small_holes", "merge_wide_necks", "padded_raster_order", "propose", "propose_objects", "proposal_instances", "segment_auto", "split_instances", "tiles", "zones"]
