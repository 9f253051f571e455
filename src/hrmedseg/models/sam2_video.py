"""HRMedSegSAM2 as sam2's video predictor: SAM2's memory attention and memory bank on our encoder.

An HRMedSegSAM2 is a sam2 ``SAM2Base`` (see :mod:`hrmedseg.models.sam2`); sam2's
``SAM2VideoPredictor`` is ``SAM2Base`` plus the inference-state code of SAM2's video method
(prompting a frame, ``propagate_in_video`` forward or in reverse through the memory bank).
:func:`build_video_predictor` builds that predictor *sharing* the model's modules and tensors
(nothing is copied, so it always runs the model's current weights), with the post-processing
``sam2.build_sam.build_sam2_video_predictor`` switches on.

The memory modules (``memory_attention.*``, ``memory_encoder.*``, ``obj_ptr_proj``, ...) are
only meaningful when loaded from a SAM2 checkpoint (``{"model": state_dict}`` as Meta ships
them): ``build_hrmedseg_sam2(encoder, decoder=FILE)`` loads them with the decoder, and
:func:`load_sam2_memory` adds them to an HRMedSegSAM2 built or fine-tuned without them.

sam2's ``init_state`` only reads a video file or a JPEG folder; :func:`new_inference_state`
makes the same state around any frame source (the engine's lazily encoded crops of a stack).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..weights.bundle import WeightsError
from .info import LoadedModel, Sam2Settings
from .sam2 import DEFAULT_SAM2_CONFIG, _is_image_path_key, build_sam2_base, read_sam2_decoder
from .state_dict import compare_state, describe_mismatch

# sam2 fills small holes in its masks with a CUDA extension (sam2._C); without it, every frame
# would only warn that the step is skipped.
FILL_HOLE_AREA = 8 if importlib.util.find_spec("sam2._C") is not None else 0


def _video_predictor_class() -> type:
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    class ScoredVideoPredictor(SAM2VideoPredictor):
        """sam2's ``SAM2VideoPredictor`` that also keeps each frame's predicted IoU.

        sam2 drops the IoU head's output from the per-frame record it stores; the engine's stop
        rule needs it, so it is kept as ``"iou"`` (shape (B,): the IoU of the mask sam2 chose,
        the best by IoU when it decoded several) beside ``"object_score_logits"``.
        """

        def _forward_sam_heads(self, *args: Any, **kwargs: Any):
            outputs = super()._forward_sam_heads(*args, **kwargs)
            self._last_iou = outputs[2].max(dim=-1).values  # ious (B, M): sam2 keeps the best of M
            return outputs

        def _run_single_frame_inference(self, *args: Any, **kwargs: Any):
            compact_out, pred_masks = super()._run_single_frame_inference(*args, **kwargs)
            compact_out["iou"] = self._last_iou
            return compact_out, pred_masks

    return ScoredVideoPredictor


def has_memory_weights(model: nn.Module) -> bool:
    """True for a SAM2Base with video-memory modules (memory attention and memory encoder)."""
    return all(getattr(model, name, None) is not None for name in ("memory_attention", "memory_encoder"))


def build_video_predictor(model: nn.Module, config: str = DEFAULT_SAM2_CONFIG) -> nn.Module:
    """sam2's ``SAM2VideoPredictor`` (with per-frame IoU, see above) over ``model``'s modules, in eval mode.

    Args:
        model: a ``SAM2Base`` (HRMedSegSAM2 or SAM2 itself) with its video-memory modules.
        config: the sam2 config the model was built from (``metadata.sam2.sam2_config``); it
            gives the predictor's settings (number of memories, object pointers, ...).

    Every child module and tensor of ``model`` is shared, not copied: the predictor runs the
    model's weights as they are at each call, on its device. Its input size is the model's
    ``image_size``; ``binarize_mask_from_pts_for_mem_enc`` and hole filling are switched on
    as in ``sam2.build_sam.build_sam2_video_predictor`` (hole filling only with sam2's CUDA
    extension, :data:`FILL_HOLE_AREA`).
    """
    if not has_memory_weights(model):
        raise WeightsError(f"{type(model).__name__} has no video-memory modules (memory_attention, memory_encoder)")
    video = build_sam2_base(
        model.image_encoder, config, model_class=_video_predictor_class(), image_size=int(model.image_size),
        memory_attention=model.memory_attention, memory_encoder=model.memory_encoder,
        binarize_mask_from_pts_for_mem_enc=True, fill_hole_area=FILL_HOLE_AREA,
    )
    for name, child in model.named_children():
        setattr(video, name, child)
    for name, tensor in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]:
        setattr(video, name, tensor)
    if list(video.state_dict()) != list(model.state_dict()):
        extra = sorted(set(video.state_dict()) ^ set(model.state_dict()))
        raise WeightsError(f"sam2 config {config} does not fit this {type(model).__name__}: tensors {extra[:3]} differ")
    return video.eval()


def new_inference_state(video: nn.Module, frames: Any, frame_size: int, offload_state_to_cpu: bool = False) -> dict:
    """``SAM2VideoPredictor.init_state``'s state around ``frames`` instead of a video file.

    ``frames``: ``len(frames)`` frames; ``frames[t]`` the (3, S, S) normalised frame (what
    ``init_state`` loads) and ``frames.get(t, None)`` ``(image, backbone_out)`` of frame t, the
    value sam2 keeps in ``state["cached_features"]``: sam2 looks there before encoding a
    frame, so a source that always answers decides how frames are encoded and cached.
    ``frame_size``: the frames' height and width, which sam2 calls the video's; prompts given
    with ``normalize_coords=True`` are then in frame pixels.
    """
    device = video.device
    return {
        "images": frames,
        "num_frames": len(frames),
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": offload_state_to_cpu,
        "video_height": frame_size,
        "video_width": frame_size,
        "device": device,
        "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": frames,
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def load_sam2_memory(loaded: LoadedModel, checkpoint: str | os.PathLike) -> LoadedModel:
    """Load the video-memory tensors of a SAM2 checkpoint into an HRMedSegSAM2, in place.

    ``checkpoint``: a SAM2/SAM2.1 file (``{"model": state_dict}``, e.g. sam2.1_hiera_tiny.pt) or a
    "sam2_prompt_decoder" bundle with memory. Only the tensors outside SAM2's single-image path
    are loaded (``memory_attention.*``, ``memory_encoder.*``, ``obj_ptr_proj.*``,
    ``maskmem_tpos_enc``, ...): the model's encoder, prompt encoder and mask decoder (e.g.
    fine-tuned ones) stay. Returns the model with ``metadata.sam2.memory`` True.

    Raises:
        WeightsError: naming the file when it has no memory tensors or they do not fit the model.
    """
    model, metadata = loaded
    state, found = read_sam2_decoder(checkpoint)
    memory = {k: v for k, v in state.items() if not _is_image_path_key(k)}
    if not found.get("memory") or not memory:
        raise WeightsError(f"{checkpoint} holds no SAM2 video-memory tensors; pass a SAM2 checkpoint such as sam2.1_hiera_tiny.pt")
    own = model.state_dict()
    required = sorted(k for k in own if not k.startswith("image_encoder.") and not _is_image_path_key(k))
    missing, unexpected, mismatched = compare_state(own, memory, required)
    if unexpected or missing or mismatched:
        raise WeightsError(f"{checkpoint} does not fit this model's memory modules: " + describe_mismatch(missing, unexpected, mismatched))
    model.load_state_dict(memory, strict=False)
    settings = metadata.sam2 or Sam2Settings(found["sam2_config"])
    return LoadedModel(model, dataclasses.replace(metadata, sam2=dataclasses.replace(settings, memory=True)))


__all__ = ["FILL_HOLE_AREA", "build_video_predictor", "has_memory_weights", "load_sam2_memory", "new_inference_state"]
