"""Propagating objects prompted on one slice through a stack (Z or T as the leading axis).

    from hrmedseg.engine import BoxPredictor
    from hrmedseg.engine.propagation import SlicePrompt, propagate
    result = propagate(BoxPredictor("hrmedseg_sam_default"), "stack.tif", [SlicePrompt(15, 1, box=(10, 12, 30, 33))])
    result.labels          # (Z, H, W) uint32

Two methods:

- ``"neighbour"`` (any box model): from each prompted slice, forward and backward, the next
  slice is prompted with the neighbour slice's mask's bounding box (``BOX_GROWTH`` wider per
  side, room to move and grow; ``grow=0`` for objects prompted on their largest section), with ``click=True`` one
  positive click at its most interior pixel (the distance transform's maximum; off by default:
  a clicked mask is the model's own, without the box prior rule, and on stardist's nuclei it
  grew onto touching nuclei), and, only with ``mask_prompt=True``, its low-resolution logits as
  SAM's mask prompt (off: on a moving ball it made masks leak a little further every slice,
  Dice 0.96 -> 0.27 three slices away, against 0.81 without). A chain stops (the object has
  left the stack that way) when the mask's area falls below ``min_area``, when its IoU with the
  neighbour slice's mask falls below ``min_overlap`` (the mask jumped elsewhere), when its
  predicted IoU falls below ``min_score`` (or ``min_relative_score`` times the prompted
  slice's), when more than ``max_taken`` of its pixels are already another object's on that
  slice (it ran onto a touching object), or, with ``max_growth``, when its area jumps above
  that many times the neighbour's. ``PropagationResult.stops`` says which rule ended each
  chain. Measured on stardist's nuclei (docs/benchmarks.md, issue 16): chains rarely stop
  where the object ends (a box over background still gets a blob with a plausible score), and
  such overruns overwrite the touching objects' slices; ``max_taken`` stops most of those.
  All objects advance together, one slice a step, so the objects on a slice share its crop
  embeddings (one encoder call per crop), which the predictor caches per slice like any 2D crop.
- ``"sam2"`` (HRMedSegSAM2 models): sam2's video predictor (memory attention and memory bank),
  in :mod:`hrmedseg.engine.sam2_video`.

An object may be prompted on several slices: each slice then takes its mask from the nearest
prompt (ties: the earlier slice's), so a correction on one slice re-propagates its own half of
the way to the next prompt. A prompt may be a mask as a person painted it (``SlicePrompt.mask``):
it is kept as it is on its slice and propagated from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..io.stacks import LazyStack, open_stack
from .crops import candidate_crops
from .labels import ObjectMask, paste_object

log = logging.getLogger(__name__)

PROPAGATION_METHODS = ("neighbour", "sam2")
#: masks smaller than this many pixels end a chain (the object has left the stack)
DEFAULT_MIN_AREA = 10
#: a predicted IoU below this ends a chain (the model no longer sees the object)
DEFAULT_MIN_SCORE = 0.7
#: an IoU with the neighbour slice's mask below this ends a chain (the mask jumped elsewhere)
DEFAULT_MIN_OVERLAP = 0.3
#: the next slice's box is the neighbour's mask box this fraction of its side wider per side: room
#: for an object that moves or grows (with 0, the tight box, a ball prompted on a small section
#: was lost before its middle; on stardist's nuclei, prompted on their largest section, 0 did
#: better: docs/benchmarks.md, issue 16)
BOX_GROWTH = 0.05
#: a mask with more than this fraction of its pixels already another object's on its slice ends its chain
DEFAULT_MAX_TAKEN = 0.5


@dataclass
class SlicePrompt:
    """One object prompted on one slice of a stack, in native pixels of that slice.

    slice_index: index along the stack's leading axis. box: (x0, y0, x1, y1) or None.
    points: (P, 2) xy clicks (may be empty); point_labels: (P,) 1 positive / 0 negative.
    mask: None, or the object's (H, W) bool mask on that slice as a person painted it: taken as
    it is (no model call, score 1.0) and propagated from (box and points are then ignored).
    object_id: the label the object gets in the result (>= 1).
    """

    slice_index: int
    object_id: int
    box: Sequence[float] | None = None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mask: np.ndarray | None = None


@dataclass
class PropagationResult:
    """Objects segmented through a stack.

    labels: (Z, H, W) uint32 label volume, 0 background, object ids from the prompts.
    scores: {object_id: {slice_index: predicted IoU}} for every slice the object was found on.
    extents: {object_id: (first_slice, last_slice)} inclusive range where the object was found.
    stops: {object_id: {step: (slice, reason)}} per chain (step +1 forward, -1 backward) the
        slice whose mask was dropped and why (the rule of :meth:`NeighbourRules.stop_reason`:
        "min_area", "min_score", "min_overlap", "max_growth", "max_taken"); a chain
        that ran to the end of its range ("end") gives the last slice it was allowed to reach.

    cancelled: True when ``cancel`` stopped the work (labels then hold what was done).
    """

    labels: np.ndarray
    scores: dict[int, dict[int, float]]
    extents: dict[int, tuple[int, int]]
    cancelled: bool = False
    stops: dict[int, dict[int, tuple[int, str]]] = field(default_factory=dict)


@dataclass
class _Chain:
    """One object carried from one prompt's slice one way (step +1 or -1) up to ``last`` (inclusive)."""

    object_id: int
    step: int
    next_slice: int
    last: int
    previous: ObjectMask
    # the prompted slice's predicted IoU, for the relative stop rule (None for a painted mask:
    # the first propagated slice's then)
    first_score: float | None = None

    @property
    def remaining(self) -> int:
        return max(0, (self.last - self.next_slice) * self.step + 1)


def mask_box(obj: ObjectMask, grow: float = 0.0, shape_yx: tuple[int, int] | None = None) -> np.ndarray:
    """(4,) native xyxy bounding box of a non-empty object's mask, ``grow`` x its side wider per
    side (room for an object that moves or grows between slices), clipped to ``shape_yx``."""
    ys, xs = np.nonzero(obj.mask)
    y0, _, x0, _ = obj.region
    box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], np.float64)
    pad = grow * np.array([box[2] - box[0], box[3] - box[1]] * 2)
    box += pad * [-1, -1, 1, 1]
    if shape_yx is not None:
        box = np.clip(box, 0, [shape_yx[1], shape_yx[0]] * 2)
    return box


def interior_point(obj: ObjectMask) -> np.ndarray:
    """(1, 2) native xy of the mask's most interior pixel (the distance transform's maximum)."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(obj.mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    y0, _, x0, _ = obj.region
    return np.array([[x0 + c + 0.5, y0 + r + 0.5]])


def mask_iou(a: ObjectMask, b: ObjectMask) -> float:
    """IoU of two objects' masks in native pixels (each mask lies in its own region)."""
    if a.empty or b.empty:
        return 0.0
    (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = a.region, b.region
    y0, y1, x0, x1 = max(ay0, by0), min(ay1, by1), max(ax0, bx0), min(ax1, bx1)
    both = 0
    if y0 < y1 and x0 < x1:
        both = int((a.mask[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0] & b.mask[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]).sum())
    return both / max(a.area + b.area - both, 1)


def check_slice_prompts(prompts: Sequence[SlicePrompt], n_slices: int, shape_yx: tuple[int, int] | None = None) -> None:
    """InputError naming the first bad prompt (slice outside the stack, id < 1, nothing to prompt
    with, a mask of another shape than the slices' ``shape_yx``, a slice prompted twice)."""
    seen: set[tuple[int, int]] = set()
    for i, p in enumerate(prompts):
        what = f"prompt {i} (object {p.object_id})"
        if not 0 <= int(p.slice_index) < n_slices:
            raise InputError(f"{what}: slice {p.slice_index} is outside the stack, which has {n_slices} slices (0..{n_slices - 1})")
        if int(p.object_id) < 1:
            raise InputError(f"{what}: object ids start at 1 (0 is the background)")
        if p.mask is not None:
            if shape_yx is not None and tuple(np.shape(p.mask)) != tuple(shape_yx):
                raise InputError(f"{what}: its mask is {tuple(np.shape(p.mask))}, but the stack's slices are {tuple(shape_yx)} (H, W)")
        elif p.box is None and not len(p.points):
            raise InputError(f"{what} has neither a box, nor points, nor a mask")
        key = (int(p.object_id), int(p.slice_index))
        if key in seen:
            raise InputError(f"{what}: object {p.object_id} is prompted twice on slice {p.slice_index}; give one prompt per object and slice")
        seen.add(key)


def _territories(slices: list[int], n_slices: int, max_slices: int | None) -> list[tuple[int, int]]:
    """Per sorted prompted slice, the inclusive range of slices nearer to it than to the others."""
    out = []
    for j, a in enumerate(slices):
        lo = (slices[j - 1] + a) // 2 + 1 if j else 0
        hi = (a + slices[j + 1]) // 2 if j + 1 < len(slices) else n_slices - 1
        if max_slices is not None:
            lo, hi = max(lo, a - max_slices), min(hi, a + max_slices)
        out.append((lo, hi))
    return out


def _predict_slice(predictor: Any, image: Any, prompts: list[dict]) -> list[ObjectMask]:
    """One ``predict_boxes`` call for the objects of one slice (they share its crop embeddings)."""
    boxes = np.array([[np.nan] * 4 if p.get("box") is None else p["box"] for p in prompts], np.float64).reshape(-1, 4)
    keys: dict[str, Any] = {
        "points": [np.asarray(p.get("points", np.zeros((0, 2))), np.float64).reshape(-1, 2) for p in prompts],
        "point_labels": [np.asarray(p.get("point_labels", np.ones(len(p.get("points", ())))), np.int64) for p in prompts],
    }
    if any(p.get("crop") is not None for p in prompts):
        keys["crops"] = [p.get("crop") for p in prompts]
        keys["mask_inputs"] = [p.get("mask_input") for p in prompts]
        keys["click_update"] = "sam"  # the mask input is the neighbour slice's: this slice's mask is new
    return list(predictor.predict_boxes(image, boxes, **keys))


def painted_object(mask: np.ndarray) -> ObjectMask:
    """An (H, W) mask a person painted as an ObjectMask over its bounding region (score 1.0)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return ObjectMask((0.0, 0.0, 0.0, 0.0), (0, 0, 0, 0), np.zeros((0, 0), bool), 1.0)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return ObjectMask((float(x0), float(y0), float(x1), float(y1)), (y0, y1, x0, x1), mask[y0:y1, x0:x1].copy(), 1.0)


def neighbour_prompt(previous: ObjectMask, policy: Any, shape_yx: tuple[int, int], mask_prompt: bool = False, grow: float = BOX_GROWTH,
                     click: bool = False) -> dict:
    """The next slice's prompt from a neighbour slice's result: its mask's box (``grow`` wider),
    with ``click`` one positive click at its interior point, and with ``mask_prompt`` (when the
    box still fits that result's crop) its logits as mask prompt."""
    box = mask_box(previous, grow, shape_yx)
    prompt: dict[str, Any] = {"box": box}
    if click:
        prompt["points"], prompt["point_labels"] = interior_point(previous), np.ones(1, np.int64)
    if mask_prompt and previous.crop is not None and previous.crop in candidate_crops(box, policy, shape_yx):
        prompt["crop"], prompt["mask_input"] = previous.crop, previous.low_res_logits
    return prompt


@dataclass(frozen=True)
class NeighbourRules:
    """How method "neighbour" prompts each next slice and when a chain stops (see ``propagate``).

    min_area: masks smaller than this (px) end a chain. min_score: so do masks with a lower
    predicted IoU; min_relative_score: ... or with a predicted IoU below this fraction of the
    prompted slice's (0: off). min_overlap: ... or whose IoU with the neighbour slice's mask is
    lower. max_growth: ... or whose area exceeds the neighbour's this many times (0: off).
    max_taken: ... or with more than this fraction of its pixels already another object's on
    that slice (it ran onto a touching object; 1: off).
    grow: the next box is the neighbour's mask box this fraction of its side wider per side. click: add a positive click at the neighbour mask's interior point. mask_prompt: pass
    the neighbour's logits as SAM's mask prompt.
    """

    min_area: int = DEFAULT_MIN_AREA
    min_score: float = DEFAULT_MIN_SCORE
    min_overlap: float = DEFAULT_MIN_OVERLAP
    min_relative_score: float = 0.0
    grow: float = BOX_GROWTH
    click: bool = False
    mask_prompt: bool = False
    max_growth: float = 0.0
    max_taken: float = DEFAULT_MAX_TAKEN

    def __post_init__(self) -> None:
        if self.max_growth and self.max_growth < 1:
            raise InputError(f"max_growth {self.max_growth} would stop every chain: give a factor >= 1 (0: off)")
        if not 0 <= self.max_taken <= 1:
            raise InputError(f"max_taken {self.max_taken} is a fraction of a mask's pixels: give 0..1 (1: off)")

    def stop_reason(self, obj: ObjectMask, previous: ObjectMask, first_score: float | None, taken: float = 0.0) -> str | None:
        """Why ``obj`` (the mask on the next slice) ends its chain, or None to keep it. ``taken``:
        the fraction of its pixels already labelled as another object on that slice."""
        if obj.area < self.min_area:
            return "min_area"
        relative = 0.0 if first_score is None else self.min_relative_score * first_score
        if obj.score < self.min_score or obj.score < relative:
            return "min_score"
        if mask_iou(obj, previous) < self.min_overlap:
            return "min_overlap"
        if self.max_growth and obj.area > self.max_growth * previous.area:
            return "max_growth"  # a section changes smoothly between slices: a jump in area is a leak
        if taken > self.max_taken:
            return "max_taken"
        return None


def taken_fraction(plane: np.ndarray, obj: ObjectMask, object_id: int) -> float:
    """Fraction of ``obj``'s pixels that ``plane`` (H, W labels) already gives another object."""
    if obj.empty:
        return 0.0
    y0, y1, x0, x1 = obj.region
    under = plane[y0:y1, x0:x1][obj.mask]
    return float(((under != 0) & (under != object_id)).mean())


def propagate(
    predictor: Any,
    stack: Any,
    prompts: Sequence[SlicePrompt],
    *,
    method: str = "neighbour",
    min_area: int = DEFAULT_MIN_AREA,
    min_score: float = DEFAULT_MIN_SCORE,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    max_slices: int | None = None,
    mask_prompt: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    min_relative_score: float = 0.0,
    grow: float = BOX_GROWTH,
    click: bool = False,
    max_growth: float = 0.0,
    max_taken: float = DEFAULT_MAX_TAKEN,
) -> PropagationResult:
    """Segment each prompted object on every slice of ``stack`` it reaches (see the module docstring).

    Args:
        predictor: a :class:`~hrmedseg.engine.BoxPredictor` (for "sam2": of an HRMedSegSAM2 model).
        stack: anything :func:`hrmedseg.io.stacks.open_stack` takes (a 3D TIFF, an OME-Zarr with
            a z or t axis, a (Z, Y, X[, C]) array) or a LazyStack; slices are read lazily.
        prompts: one :class:`SlicePrompt` per object and prompted slice.
        method: "neighbour" (any box model) or "sam2" (sam2's video predictor).
        min_area, min_score: a propagated mask smaller than ``min_area`` pixels or with a
            predicted IoU below ``min_score`` is dropped and ends that object's chain that way
            (the prompted slices themselves are always kept).
        min_overlap: "neighbour": so is a mask whose IoU with the neighbour slice's mask is lower.
        max_slices: at most this many slices from each prompt each way (None: no limit).
        mask_prompt: "neighbour": pass the neighbour's logits as SAM's mask prompt.
        min_relative_score, grow, click, max_growth, max_taken: "neighbour": see :class:`NeighbourRules`.
        progress: ``progress(done, total)`` after each slice step (total: slices still reachable).
        cancel: checked between slices; when it returns True the work stops and the result holds
            what was done (``cancelled`` True).

    Returns:
        A :class:`PropagationResult`: (Z, H, W) uint32 labels, per-slice scores, extents.
    """
    if method not in PROPAGATION_METHODS:
        raise InputError(f"unknown propagation method {method!r} (use {', '.join(PROPAGATION_METHODS)})")
    stack = open_stack(stack)
    if not prompts:
        raise InputError("no prompts: give at least one object's box or clicks on one slice")
    check_slice_prompts(prompts, stack.n_slices, stack.shape_yx)
    if method == "sam2":
        try:
            from .sam2_video import propagate_sam2
        except ImportError as err:
            raise InputError(f"propagation method 'sam2' needs an HRMedSegSAM2 model and the sam2 video predictor ({err}); use method 'neighbour'") from err
        return propagate_sam2(predictor, stack, prompts, min_area=min_area, min_score=min_score, max_slices=max_slices,
                              progress=progress, cancel=cancel)
    rules = NeighbourRules(min_area=min_area, min_score=min_score, min_overlap=min_overlap, min_relative_score=min_relative_score,
                           grow=grow, click=click, mask_prompt=mask_prompt, max_growth=max_growth, max_taken=max_taken)
    return _propagate_neighbour(predictor, stack, prompts, rules, max_slices, progress, cancel)


def _propagate_neighbour(
    predictor: Any, stack: LazyStack, prompts: Sequence[SlicePrompt], rules: NeighbourRules, max_slices: int | None,
    progress: Callable[[int, int], None] | None, cancel: Callable[[], bool] | None,
) -> PropagationResult:
    labels = np.zeros((stack.n_slices, *stack.shape_yx), np.uint32)
    scores: dict[int, dict[int, float]] = {}
    stops: dict[int, dict[int, tuple[int, str]]] = {}
    by_object: dict[int, list[SlicePrompt]] = {}
    for p in prompts:
        by_object.setdefault(int(p.object_id), []).append(p)
    ranges: dict[tuple[int, int], tuple[int, int]] = {}
    for oid, own in by_object.items():
        own.sort(key=lambda p: p.slice_index)
        for p, r in zip(own, _territories([int(p.slice_index) for p in own], stack.n_slices, max_slices)):
            ranges[(oid, int(p.slice_index))] = r
    total = sum(hi - lo + 1 for lo, hi in ranges.values())
    done = 0

    def keep(oid: int, z: int, obj: ObjectMask) -> None:
        paste_object(labels[z], obj, oid)
        scores.setdefault(oid, {})[z] = obj.score

    def stopped() -> bool:
        return cancel is not None and bool(cancel())

    # Step 0: the prompted slices, all objects of a slice in one call.
    chains: list[_Chain] = []
    on_slice: dict[int, list[SlicePrompt]] = {}
    for p in prompts:
        on_slice.setdefault(int(p.slice_index), []).append(p)
    for z, here in sorted(on_slice.items()):
        if stopped():
            return _result(labels, scores, stops, cancelled=True)
        asked = [p for p in here if p.mask is None]
        given = [{"box": p.box, "points": p.points, "point_labels": p.point_labels} for p in asked]
        found = dict(zip(map(id, asked), _predict_slice(predictor, stack.slice(z), given) if asked else []))
        for p in here:
            obj = found[id(p)] if p.mask is None else painted_object(p.mask)
            oid = int(p.object_id)
            done += 1
            lo, hi = ranges[(oid, z)]
            if obj.empty:
                log.warning("object %d gave an empty mask on its prompted slice %d: nothing to propagate", oid, z)
                done += hi - lo
                continue
            keep(oid, z, obj)
            for step, last in ((1, hi), (-1, lo)):
                chain = _Chain(oid, step, z + step, last, obj, None if p.mask is not None else obj.score)
                if obj.area < rules.min_area:
                    done += chain.remaining
                    stops.setdefault(oid, {})[step] = (z, "min_area")
                elif chain.remaining:
                    chains.append(chain)
                else:
                    stops.setdefault(oid, {})[step] = (last, "end")
        if progress is not None:
            progress(done, total)
    # Then every live chain one slice a step, the objects of a slice together.
    while chains:
        steps: dict[int, list[_Chain]] = {}
        for c in chains:
            steps.setdefault(c.next_slice, []).append(c)
        chains = []
        for z, here in sorted(steps.items()):
            if stopped():
                return _result(labels, scores, stops, cancelled=True)
            asked = [neighbour_prompt(c.previous, predictor.policy, stack.shape_yx, rules.mask_prompt, rules.grow, rules.click) for c in here]
            for c, obj in zip(here, _predict_slice(predictor, stack.slice(z), asked)):
                done += 1
                taken = taken_fraction(labels[z], obj, c.object_id) if rules.max_taken < 1 else 0.0
                reason = rules.stop_reason(obj, c.previous, c.first_score, taken)
                if reason is not None:
                    done += c.remaining - 1  # the object has left the stack this way
                    stops.setdefault(c.object_id, {})[c.step] = (z, reason)
                    continue
                keep(c.object_id, z, obj)
                c.previous, c.next_slice = obj, z + c.step
                c.first_score = obj.score if c.first_score is None else c.first_score
                if c.remaining:
                    chains.append(c)
                else:
                    stops.setdefault(c.object_id, {})[c.step] = (c.last, "end")
            if progress is not None:
                progress(done, total)
    return _result(labels, scores, stops)


def _result(labels: np.ndarray, scores: dict[int, dict[int, float]], stops: dict[int, dict[int, tuple[int, str]]] | None = None,
            cancelled: bool = False) -> PropagationResult:
    extents = {oid: (min(per), max(per)) for oid, per in scores.items() if per}
    return PropagationResult(labels, scores, extents, cancelled, stops or {})
