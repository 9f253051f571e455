"""The two model steps the engine calls, each behind one small class so either can be swapped.

- :class:`SamImageEncoder`: a crop in 0..255 RGB (1, 3, h, w), h, w <= input size -> the image
  embedding (1, 256, 64, 64); normalises with the model's ``pixel_mean``/``pixel_std`` and pads
  bottom/right with zeros after normalisation, exactly as ``Sam.preprocess``.
- :class:`SamBoxDecoder`: an embedding and N boxes in crop-input pixels -> low-res mask logits
  (N, 1, 256, 256) and predicted IoU scores (N,), one mask per box (SAM's single-mask output,
  which SamPredictor also uses for box prompts). A faster decoder only has to match this call.
  Every step also takes, as keywords, per-object clicks ``points`` (N, P, 2) xy input px with
  ``point_labels`` (N, P) (1 positive, 0 negative) and a low-res mask prompt ``mask_inputs``
  (N, 1, 256, 256) (an earlier call's logits, SAM's ``mask_input``); ``boxes`` may then be
  None (objects prompted by points alone). A decoder given only boxes is called with boxes only.
- :class:`RegionBoxDecoder`: the same call on ``FastSamBoxDecoder`` (hrmedseg.models.fast_decoder),
  plus ``margin=``: logits are computed only under each box plus ``margin`` low-res pixels
  (:func:`region_margin` gives the margin that covers everything the engine reads).
- :class:`Sam2ImageEncoder` / :class:`Sam2BoxDecoder`: the same two steps for sam2 ``SAM2Base``
  models (HRMedSegSAM2, SAM2 itself). The encoder returns :class:`Sam2Features` (the 1/16
  embedding with ``no_mem_embed`` added, plus the 1/4 and 1/8 maps SAM2's decoder reads), the
  decoder the same (N, 1, h_lr, w_lr) logits and (N,) scores as :class:`SamBoxDecoder`.

:func:`build_steps` picks the encoder and decoder of a backend (``hrmedseg.models.runtime``):
``"reference"`` keeps the plain PyTorch modules (what the tests compare against); ``"fast"`` and
``"fast-bf16"`` use ``FastHRMedSegEncoder`` (when the model's image encoder is an
``HRMedSegEncoder``) and :class:`RegionBoxDecoder` (when the mask decoder is SAM's two-block one;
in bf16 under ``"fast-bf16"`` on a CPU where calibration measured that faster:
``hrmedseg.models.runtime.decoder_dtype``);
``"onnxruntime"`` (CPU) runs that encoder exported to ONNX in ONNX Runtime, with the same decoder.
SAM2 models have no fast path: they run their plain modules under every backend.

Boxes reach SAM's and SAM2's decoders through ``hrmedseg.models.prompting``, the path
fine-tuning's model wrappers take too.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.fast_decoder import FastSamBoxDecoder
from ..models.preprocessing import Preprocessing
from ..models.prompting import Sam2Features, decode_sam2_boxes, decode_sam_boxes, prompt_tensors, sam2_features
from .crops import Crop, CropPolicy, mask_region

log = logging.getLogger(__name__)

ENGINE_BACKENDS = ("reference", "fast", "fast-bf16", "onnxruntime")


class BoxDecoder(Protocol):
    def __call__(self, embedding: Any, boxes: torch.Tensor | None, **prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...



def is_sam2_model(model: nn.Module) -> bool:
    """True for sam2 ``SAM2Base``-like models (``sam_prompt_encoder``, ``sam_mask_decoder``, ``forward_image``)."""
    return all(hasattr(model, a) for a in ("sam_prompt_encoder", "sam_mask_decoder", "forward_image"))


def _best_single_mask(logits: torch.Tensor, iou: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, M, h, w) logits, (N, M) IoU -> (N, 1, h, w), (N,): the only mask, or the best of M by IoU."""
    if not multimask:
        return logits, iou[:, 0]
    best = iou.argmax(dim=1)  # as SamAutomaticMaskGenerator does
    idx = torch.arange(len(best), device=best.device)
    return logits[idx, best][:, None], iou[idx, best]


class SamImageEncoder:
    """Wraps a segment_anything ``Sam``-like model's image encoder.

    ``image_encoder`` replaces ``model.image_encoder`` for the forward pass (e.g. a
    ``FastHRMedSegEncoder`` built from it); normalisation and padding stay the model's.
    """

    def __init__(self, model: nn.Module, image_encoder: nn.Module | None = None) -> None:
        self.model = model
        self.image_encoder = image_encoder if image_encoder is not None else model.image_encoder
        self.input_size = int(model.image_encoder.img_size)

    # no_grad, not inference_mode: FastSamBoxDecoder recognises an embedding it has prepared by
    # its version counter, which inference tensors do not have.
    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """image: (1, 3, h, w) float 0..255, h, w <= input_size -> (1, 256, S/16, S/16)."""
        device = self.model.pixel_mean.device
        x = (image.to(device) - self.model.pixel_mean) / self.model.pixel_std
        h, w = x.shape[-2:]
        x = F.pad(x, (0, self.input_size - w, 0, self.input_size - h))
        return self.image_encoder(x)


class SamBoxDecoder:
    """SAM's prompt encoder + mask decoder for box prompts, batched over boxes."""

    def __init__(self, model: nn.Module, multimask: bool = False) -> None:
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.multimask = multimask

    @torch.inference_mode()
    def __call__(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (1, 256, 64, 64); boxes (N, 4) xyxy input px (and the module docstring's
        prompts) -> logits (N, 1, 256, 256), scores (N,)."""
        p = prompt_tensors(embedding.device, boxes, points, point_labels, mask_inputs)
        logits, iou = decode_sam_boxes(self.prompt_encoder, self.mask_decoder, embedding, multimask=self.multimask, **p)
        return _best_single_mask(logits, iou, self.multimask)


class RegionBoxDecoder(FastSamBoxDecoder):
    """``FastSamBoxDecoder`` whose region margin is given per call.

    ``decoder(embedding, boxes, margin=None, extent=None, **prompts)``: ``margin`` None computes
    the full low-res logits (as SAM); an int computes them only under each ``extent`` box (input
    px; default the boxes) plus ``margin`` low-res pixels and fills the rest with -1e4. The
    engine passes :func:`region_margin` of the batch and each object's extent (its box and
    clicks), so every logit it reads is computed.
    """

    def __call__(
        self, embedding: torch.Tensor, boxes: torch.Tensor | None, margin: int | None = None, **prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.margin = margin
        return super().__call__(embedding, boxes, **prompts)

    @staticmethod
    def low_res_size(embedding: torch.Tensor) -> int:
        """Side of the low-res logit grid for ``embedding`` (1, C, h, h): SAM's decoder upscales 4x."""
        return 4 * int(embedding.shape[-1])


# --------------------------------------------------------------------------------------------
# SAM2 (sam2 SAM2Base: HRMedSegSAM2, SAM2 itself)
# --------------------------------------------------------------------------------------------


def sam2_input_preprocessing(model: nn.Module) -> Preprocessing:
    """The pixel normalisation a SAM2Base model's image encoder expects, in 0..255 units.

    HRMedSegSAM2's encoder records it (``input_preprocessing``: ImageNet statistics, as
    SAM2ImagePredictor applies, re-normalised inside for its LGViT); SAM2's own Hiera encoder
    expects SAM2ImagePredictor's ImageNet statistics.
    """
    from ..models.sam2 import SAM2_PREDICTOR_PREPROCESSING

    return getattr(model.image_encoder, "input_preprocessing", SAM2_PREDICTOR_PREPROCESSING)


class Sam2ImageEncoder:
    """A SAM2Base model's image path, for the engine's square crops.

    The crop (0..255 RGB, h, w <= S = ``model.image_size``) is padded bottom/right to S x S with
    the rounded pixel mean (``Preprocessing.pad_value``, which training pads with too) and
    normalised with :func:`sam2_input_preprocessing`; it is never stretched. For an S x S image
    this is exactly what ``SAM2ImagePredictor.set_image`` computes (which instead resizes any
    image to S x S without keeping its aspect ratio). Features come from
    ``hrmedseg.models.prompting.sam2_features`` (``no_mem_embed`` added to the 1/16 level).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.input_size = int(model.image_size)
        pe_size = tuple(int(v) for v in model.sam_prompt_encoder.input_image_size)
        if pe_size != (self.input_size, self.input_size):
            raise ValueError(
                f"{type(model).__name__}: its prompt encoder is set for {pe_size} inputs, but image_size is "
                f"{self.input_size}; boxes would be scaled wrongly"
            )
        self.preprocessing = sam2_input_preprocessing(model)
        self.pad_value = tuple(float(v) for v in self.preprocessing.pad_value)

    def pad(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w) 0..255 -> (1, 3, S, S) 0..255, padded bottom/right with the rounded pixel mean."""
        h, w = image.shape[-2:]
        if h > self.input_size or w > self.input_size:
            raise ValueError(f"crop of {h} x {w} px exceeds the model input size {self.input_size}")
        fill = torch.tensor(self.pad_value, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
        out = fill.expand(1, 3, self.input_size, self.input_size).clone()
        out[..., :h, :w] = image
        return out

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> Sam2Features:
        """image: (1, 3, h, w) float 0..255, h, w <= input_size -> :class:`Sam2Features`."""
        model = self.model
        device = model.no_mem_embed.device
        x = self.preprocessing.normalize(self.pad(image.to(device, torch.float32)))
        return sam2_features(model, x)


class Sam2BoxDecoder:
    """SAM2's prompt encoder + mask decoder for N boxes on one crop's :class:`Sam2Features`.

    Prompts go through ``hrmedseg.models.prompting.decode_sam2_boxes`` (a box is two corner points
    labelled 2 (top-left) and 3 (bottom-right), before the clicks, as ``SAM2ImagePredictor._predict``). The decoder runs in
    single-mask mode (what ``--model hrmedseg-sam2`` trains); in eval mode sam2's decoder then
    falls back to the best multimask output when the single mask is unstable
    (``dynamic_multimask_via_stability``, as in SAM2ImagePredictor). ``multimask=True`` takes the
    best of the three masks by predicted IoU.
    """

    def __init__(self, model: nn.Module, multimask: bool = False) -> None:
        self.model = model
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder
        self.multimask = multimask

    @torch.inference_mode()
    def __call__(
        self,
        features: Sam2Features,
        boxes: torch.Tensor | None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features of one crop; boxes (N, 4) xyxy input px (and the module docstring's prompts)
        -> logits (N, 1, S/4, S/4), scores (N,)."""
        p = prompt_tensors(features.image_embed.device, boxes, points, point_labels, mask_inputs)
        logits, iou = decode_sam2_boxes(self.model, features, multimask=self.multimask, **p)
        return _best_single_mask(logits, iou, self.multimask)


def region_margin(
    boxes: np.ndarray, crop: Crop, policy: CropPolicy, shape_yx: Sequence[int], low_res_size: int
) -> int:
    """Low-res margin (per side) around ``boxes`` that holds every logit the engine reads for them.

    The engine reads a box's logits only by ``logits_to_native`` over its ``mask_region``: each
    native pixel centre maps to low-res ``p = (v + 0.5 - origin) * scale * low_res / input`` and
    bilinear sampling reads cells ``floor(p - 0.5)`` and the next one (clamped to the grid).
    ``regions_from_boxes`` covers ``floor(box_lr) - margin .. ceil(box_lr) + margin`` (end
    exclusive); the returned margin is the largest shortfall over the boxes and both axes, + 1
    because the decoder sees the boxes in float32 (its floor/ceil may differ by one cell).

    Args:
        boxes: (N, 4) native xyxy (the engine's checked boxes).
        crop: their crop; policy, shape_yx: as given to ``mask_region``.
        low_res_size: side of the low-res logit grid (4 x the embedding's, 256 for SAM).
    """
    per_input = low_res_size / crop.input_size
    need = 0
    for box in np.asarray(boxes, np.float64).reshape(-1, 4):
        y0, y1, x0, x1 = mask_region(box, crop, policy, tuple(shape_yx))
        if y1 <= y0 or x1 <= x0:
            continue
        for lo_px, hi_px, b_lo, b_hi, origin in ((x0, x1, box[0], box[2], crop.x0), (y0, y1, box[1], box[3], crop.y0)):
            first = (lo_px + 0.5 - origin) * crop.scale * per_input  # first and last pixel centres, low-res
            last = (hi_px - 0.5 - origin) * crop.scale * per_input
            cell_lo = min(max(math.floor(first - 0.5), 0), low_res_size - 1)
            cell_hi = min(max(math.floor(last - 0.5) + 1, 0), low_res_size - 1)
            box_lo = math.floor((b_lo - origin) * crop.scale * per_input)
            box_hi = math.ceil((b_hi - origin) * crop.scale * per_input)
            need = max(need, box_lo - cell_lo, cell_hi + 1 - box_hi)
    return need + 1


_logged_sam2_backends: set[str] = set()


def _log_sam2_backend(model: nn.Module, backend: str) -> None:
    if backend != "reference" and backend not in _logged_sam2_backends:
        _logged_sam2_backends.add(backend)
        log.info("backend %s: %s is a SAM2 model, which has no fast path; running its plain modules", backend, type(model).__name__)


def build_steps(model: nn.Module, backend: str, aot: bool | str | None = None) -> tuple[SamImageEncoder | Sam2ImageEncoder, BoxDecoder]:
    """The engine's (encoder, decoder) for ``backend`` (one of ``ENGINE_BACKENDS``).

    Fast modules are built from the model's weights as they are now (copies / snapshots):
    build again after loading other weights into the same model. Parts the fast paths do not
    cover (a SAM ViT image encoder, a mask decoder that is not SAM's two-block one) keep the
    plain PyTorch module. SAM2 models (:func:`is_sam2_model`) get :class:`Sam2ImageEncoder` and
    :class:`Sam2BoxDecoder` under every backend (logged once per backend). ``aot``: compile the fast
    CPU encoder ahead of time (``hrmedseg.models.aot_cache.aot_mode``; None: as ``HRMEDSEG_AOT`` says).
    """
    if backend not in ENGINE_BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; expected one of {', '.join(ENGINE_BACKENDS)}")
    if is_sam2_model(model):
        _log_sam2_backend(model, backend)
        return Sam2ImageEncoder(model), Sam2BoxDecoder(model)
    if backend == "reference":
        return SamImageEncoder(model), SamBoxDecoder(model)
    from ..models.neck import HRMedSegEncoder
    from ..models.runtime import build_fast_encoder, decoder_dtype

    reference_encoder = model.image_encoder
    if isinstance(reference_encoder, HRMedSegEncoder) and next(reference_encoder.parameters()).dtype == torch.float32:
        encoder = SamImageEncoder(model, build_fast_encoder(reference_encoder, backend, aot=aot))
    else:
        log.info("backend %s: image encoder %s has no fast path; using it as is", backend, type(reference_encoder).__name__)
        encoder = SamImageEncoder(model)
    try:
        decoder: BoxDecoder = RegionBoxDecoder(model, dtype=decoder_dtype(backend, next(model.parameters()).device))
    except ValueError as err:  # e.g. a mask decoder with another transformer depth
        log.info("backend %s: %s; using the reference decoder", backend, err)
        decoder = SamBoxDecoder(model)
    return encoder, decoder
