"""Propagation through a stack with SAM2's own video method (memory attention, memory bank).

Each object is tracked by sam2's ``SAM2VideoPredictor`` (built over the HRMedSegSAM2 by
:func:`hrmedseg.models.sam2_video.build_video_predictor`): it is prompted on its slice with its
box and clicks (``add_new_points_or_box``), then ``propagate_in_video`` runs forward and in
reverse from that slice, each slice's mask conditioned on the memories of the prompted slice
and the latest tracked ones.

The "video" is a crop, as in the 2D engine: the object's extent grown by ``margin`` (so it can
move and grow), planned at the model's input size by :func:`~hrmedseg.engine.crops.plan_crops`
and read from the same window of every slice, so small objects keep their native resolution
and SAM2's spatial memories stay aligned. Masks are thresholded at native resolution from the
low-res logits (:func:`~hrmedseg.engine.crops.logits_to_native`) inside that window.

Slices are encoded by :class:`CropFrames` ``batch_size`` at a time, in the direction being
tracked, and kept in the predictor's embedding cache (keys: stack, slice, crop, intensity map,
model), so the reverse pass and other objects in the same crop reuse them. Intensities are
scaled with the prompted slice's map on every slice (one normalisation for the whole video).

An object stops in one direction at the first slice whose mask has fewer than ``min_area``
native pixels or whose predicted IoU is below ``min_score`` (SAM2's object score empties the
mask of a slice where it predicts the object absent); that slice is not labelled.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..io.readers import LazyImage
from ..io.stacks import LazyStack, open_stack
from .crops import Crop, logits_to_native, plan_crops, read_crop
from .decoder import is_sam2_model
from .intensity import ChannelScaling
from .predictor import BoxPredictor
from .prompts import check_prompts
from .propagation import PropagationResult, SlicePrompt

# Margin (fraction of the object's longer side, per side) the tracking crop leaves around the
# prompted object, so that it may move and grow before it leaves the crop.
DEFAULT_TRACK_MARGIN = 0.5


class CropFrames:
    """One crop of every slice as sam2 video frames, encoded in batches and cached.

    sam2's ``SAM2VideoPredictor`` reads a frame's backbone features from
    ``state["cached_features"].get(t)`` before it would encode ``state["images"][t]``
    (:func:`hrmedseg.models.sam2_video.new_inference_state` puts this object in both places).
    On a miss, :meth:`get` encodes slice t and the next ``batch_size - 1`` slices not yet
    cached in the direction of travel (``self.step``: +1 forward, -1 in reverse) in one
    ``forward_image`` call; each slice's features go into the predictor's embedding cache.

    Features of one frame: ``backbone_fpn`` [(1, C/8, S/4, S/4), (1, C/4, S/8, S/8),
    (1, C, S/16, S/16)] (after the mask decoder's ``conv_s0`` / ``conv_s1``, as
    ``SAM2Base.forward_image`` returns them) and ``vision_pos_enc`` (the same three maps'
    positional encodings, which do not depend on the pixels: computed once, cached, shared).
    """

    def __init__(
        self, predictor: BoxPredictor, video: torch.nn.Module, slices: LazyStack, crop: Crop,
        scaling: ChannelScaling, batch_size: int,
    ) -> None:
        self.predictor, self.video, self.slices, self.crop = predictor, video, slices, crop
        self.scaling, self.batch_size, self.step = scaling, max(1, int(batch_size)), 1
        self._positions: list[torch.Tensor] | None = None
        self._positions_key = ("sam2-video-positions", predictor._model_token, crop.input_size)
        self._latest: dict[int, list[torch.Tensor]] = {}  # the last batch, whatever the cache keeps
        # A frame's image is never read by sam2 past the cache lookup; a stand-in keeps its shape.
        self._image_stand_in = torch.zeros(1, 3, 1, 1, device=video.device)
        self._images: dict[int, LazyImage] = {}  # slice t's LazyImage, made once (its key and reader)

    def __len__(self) -> int:
        return len(self.slices)

    def image(self, t: int) -> LazyImage:
        """Slice t as a LazyImage (made once per slice)."""
        if t not in self._images:
            self._images[t] = self.slices.slice(t)
        return self._images[t]

    def _key(self, t: int) -> tuple:
        c, image = self.crop, self.image(t)
        return ("sam2-video", image.source_key, image.channels, c.scale, c.y0, c.x0, c.size, self.scaling.key, self.predictor._model_token)

    def _pixels(self, t: int) -> torch.Tensor:
        """(1, 3, S, S) slice t's crop, padded and normalised as the 2D engine's SAM2 encoder does."""
        encoder = self.predictor.encoder
        raw, _ = read_crop(self.image(t), self.crop, self.scaling.apply)
        return encoder.preprocessing.normalize(encoder.pad(raw.to(self.video.device, torch.float32)))

    def __getitem__(self, t: int) -> torch.Tensor:
        return self._pixels(t)[0]

    def _cached(self, t: int) -> list[torch.Tensor] | None:
        return self._latest.get(t) or self.predictor.cache.get(self._key(t))

    @torch.inference_mode()
    def _encode(self, frames: list[int]) -> None:
        out = self.video.forward_image(torch.cat([self._pixels(t) for t in frames]))
        self.predictor.encoder_calls += 1
        if self._positions is None:
            self._positions = [p[:1].clone() for p in out["vision_pos_enc"]]
            self.predictor.cache.put(self._positions_key, self._positions)
        self._latest = {t: [level[i : i + 1].clone() for level in out["backbone_fpn"]] for i, t in enumerate(frames)}
        for t, features in self._latest.items():
            self.predictor.cache.put(self._key(t), features)

    def get(self, t: int, default: Any = None) -> tuple[torch.Tensor, dict]:
        if self._positions is None:
            self._positions = self.predictor.cache.get(self._positions_key)
        features = self._cached(t)
        if features is None or self._positions is None:
            batch = [t]
            nxt = t + self.step
            while len(batch) < self.batch_size and 0 <= nxt < len(self) and self._cached(nxt) is None:
                batch.append(nxt)
                nxt += self.step
            self._encode(batch)
            features = self._latest[t]
        return self._image_stand_in, {"backbone_fpn": list(features), "vision_pos_enc": list(self._positions)}


def _memory_error(predictor: BoxPredictor) -> str | None:
    """Why ``predictor`` cannot run SAM2's video method, or None."""
    from ..models.sam2_video import has_memory_weights

    source = predictor.metadata.source or type(predictor.model).__name__
    if not is_sam2_model(predictor.model):
        return f"method 'sam2' needs an HRMedSegSAM2 or SAM2 model; {source} is a {type(predictor.model).__name__}"
    settings = predictor.metadata.sam2
    if not has_memory_weights(predictor.model) or (settings is not None and not settings.memory):
        return (
            f"{source} has no SAM2 video-memory weights (memory_attention.*, memory_encoder.*), so SAM2's video "
            "method cannot run on it: pass a SAM2 checkpoint with them, e.g. "
            "hrmedseg.models.sam2_video.load_sam2_memory(model, 'sam2.1_hiera_tiny.pt'), or build the model with "
            "build_hrmedseg_sam2(encoder, decoder='sam2.1_hiera_tiny.pt'); or use method 'neighbour'"
        )
    return None


def _check_prompts(prompts: Sequence[SlicePrompt], n_slices: int, shape_yx: tuple[int, int]) -> list:
    """Each prompt checked against its slice: [(prompt, ObjectPrompts of one object)]; InputError naming it."""
    seen: set[int] = set()
    checked = []
    for i, p in enumerate(prompts):
        if not 0 <= int(p.slice_index) < n_slices:
            raise InputError(f"prompt {i} (object {p.object_id}) is on slice {p.slice_index}, but the stack has {n_slices} slices")
        if int(p.object_id) < 1 or int(p.object_id) in seen:
            raise InputError(f"prompt {i} has object id {p.object_id}; ids must be >= 1 and unique")
        seen.add(int(p.object_id))
        box = None if p.box is None else [p.box]
        points = [p.points] if len(p.points) else None
        labels = [p.point_labels] if len(p.points) else None
        checked.append((p, check_prompts(box, shape_yx, points, labels, source=f"box of object {p.object_id}")))
    return checked


def tracking_crop(extent: np.ndarray, shape_yx: tuple[int, int], predictor: BoxPredictor, margin: float) -> Crop:
    """The crop an object is tracked in: its extent grown by ``margin`` x its longer side, planned as the 2D engine plans crops."""
    longest = float(max(extent[2] - extent[0], extent[3] - extent[1]))
    h, w = shape_yx
    grown = np.clip(np.asarray(extent, np.float64) + margin * longest * np.array([-1, -1, 1, 1]), 0, [w, h, w, h])
    return plan_crops(grown[None], shape_yx, predictor.policy)[0]


def propagate_sam2(
    predictor: BoxPredictor,
    stack: Any,
    prompts: Sequence[SlicePrompt],
    *,
    min_area: int,
    min_score: float,
    max_slices: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    margin: float = DEFAULT_TRACK_MARGIN,
    batch_size: int | None = None,
) -> PropagationResult:
    """Segment each prompted object on every slice it reaches, with SAM2's video method.

    Args:
        predictor: a BoxPredictor on an HRMedSegSAM2 (or SAM2) model with video-memory weights;
            its crop policy, intensity options, embedding cache and device are used.
        stack: anything :func:`hrmedseg.io.stacks.open_stack` takes (a (Z, H, W[, C]) array,
            Z or T leading, a 3D TIFF, an OME-Zarr with a z or t axis) or a LazyStack; read
            slice by slice.
        prompts: one :class:`SlicePrompt` per object (box and/or clicks on its slice).
        min_area: a slice whose mask has fewer native pixels ends the object in that direction.
        min_score: so does a slice whose predicted IoU is lower.
        max_slices: track at most this many slices on each side of the prompted one (None: all).
        progress: ``progress(done, total)`` after each slice (total: slices every object may visit).
        cancel: checked before each slice; when it returns True the result so far is returned.
        margin: tracking crop margin (:func:`tracking_crop`).
        batch_size: slices per encoder call (None: 8 on CUDA, 4 elsewhere).

    Returns:
        :class:`PropagationResult`: (Z, H, W) uint32 labels (later objects win where they
        overlap), per-slice predicted IoU and the slice range of every object found (an object
        whose own prompted slice fails the stop rule is absent from ``scores`` and ``extents``).

    Raises:
        InputError: a model without SAM2 memory weights (naming the file to pass), a bad stack,
            or a prompt outside its slice or stack.
    """
    from ..models.sam2 import sam2_config_of
    from ..models.sam2_video import build_video_predictor, new_inference_state

    problem = _memory_error(predictor)
    if problem:
        raise InputError(problem)
    slices = open_stack(stack)
    n_slices, shape_yx = len(slices), slices.shape_yx
    checked = _check_prompts(prompts, n_slices, shape_yx)
    reach = n_slices if max_slices is None else max(0, int(max_slices))
    settings = predictor.metadata.sam2
    config = settings.sam2_config if settings else sam2_config_of(predictor.model.state_dict())
    video = build_video_predictor(predictor.model, config)
    batch = batch_size or (8 if predictor.device.type == "cuda" else 4)

    labels = np.zeros((n_slices, *shape_yx), np.uint32)
    scores: dict[int, dict[int, float]] = {}
    extents: dict[int, tuple[int, int]] = {}
    spans = [(min(reach, n_slices - 1 - p.slice_index), min(reach, p.slice_index)) for p, _ in checked]
    total, done = sum(1 + f + b for f, b in spans), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None and n:
            progress(done, total)

    for (prompt, obj), (ahead, behind) in zip(checked, spans):
        oid, z0 = int(prompt.object_id), int(prompt.slice_index)
        scaling = predictor.scaling(slices.slice(z0))
        crop = tracking_crop(obj.extents[0], shape_yx, predictor, margin)
        frames = CropFrames(predictor, video, slices, crop, scaling, batch)
        state = new_inference_state(video, frames, crop.input_size)
        box = crop.box_to_input(obj.boxes[:1])[0] if obj.has_box(0) else None
        points = (obj.points[0] - [crop.x0, crop.y0]) * crop.scale if len(obj.points[0]) else None
        video.add_new_points_or_box(
            state, frame_idx=z0, obj_id=oid, box=box, points=points,
            labels=None if points is None else obj.point_labels[0].astype(np.int32),
        )
        region = (crop.y0, min(crop.y0 + crop.size, shape_yx[0]), crop.x0, min(crop.x0 + crop.size, shape_yx[1]))
        found: dict[int, float] = {}
        for reverse, planned in ((False, ahead), (True, behind)):
            if found == {} and reverse:  # the prompted slice itself failed: nothing to go back from
                advance(planned)
                break
            frames.step = -1 if reverse else 1
            visited = 0
            tracked = video.propagate_in_video(state, start_frame_idx=z0, max_frame_num_to_track=planned, reverse=reverse)
            try:
                for t, _, _ in tracked:
                    if cancel is not None and cancel():
                        return _result(labels, scores, extents, oid, found)
                    if t == z0 and reverse:
                        continue  # the prompted slice, done in the forward pass
                    out = _frame_output(state, t)
                    mask = logits_to_native(out["pred_masks"][0, 0], crop, region, predictor.mask_threshold)
                    score = float(out["iou"][0])
                    area = int(mask.sum())
                    visited += 1
                    advance(1)
                    if area < min_area or score < min_score or math.isnan(score):
                        break
                    labels[t, region[0] : region[1], region[2] : region[3]][mask] = oid
                    found[t] = score
            finally:
                tracked.close()
            advance((planned + (0 if reverse else 1)) - visited)
        _record(scores, extents, oid, found)
    return PropagationResult(labels, scores, extents)


def _frame_output(state: dict, t: int) -> dict:
    """sam2's stored record of frame t for the state's one object (conditioning or tracked)."""
    store = state["output_dict_per_obj"][0]
    return store["cond_frame_outputs"].get(t) or store["non_cond_frame_outputs"][t]


def _record(scores: dict, extents: dict, oid: int, found: dict[int, float]) -> None:
    if found:
        scores[oid] = dict(sorted(found.items()))
        extents[oid] = (min(found), max(found))


def _result(labels, scores, extents, oid, found) -> PropagationResult:
    _record(scores, extents, oid, found)
    return PropagationResult(labels, scores, extents)


__all__ = ["DEFAULT_TRACK_MARGIN", "CropFrames", "propagate_sam2", "tracking_crop"]
