"""Box-prompted models as training sees them: a batch of images and per-image boxes -> mask logits.

- :class:`BoxPromptedSegmenter` wraps HRMedSegSAM (a segment_anything ``Sam``);
- :class:`Sam2BoxPromptedSegmenter` wraps HRMedSegSAM2 (a sam2 ``SAM2Base``).

Both run the model at the training input size S (any multiple of 16) and feed boxes through
:mod:`hrmedseg.models.prompting`, the path the engine takes, so a fine-tuned model sees boxes in
use as it saw them in training. ``hrmedseg.training.finetune`` trains and saves them.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Union

import torch
from torch import nn

from .box_prior import add_box_prior
from .info import Sam2Settings
from .fast_decoder import FastMaskDecoder
from .prompting import decode_sam2_boxes, decode_sam_boxes, sam2_features, sam_box_prompt, set_prompt_geometry


PerImageOutputs = Union[list[torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]
# ``refine(decode)``: training's click iterations (hrmedseg.training.clicks), given the model's
# decoder ``decode(i, boxes_i, points=, point_labels=, mask_inputs=)`` -> ((K_i, 1, h, w) logits
# with the box prior added, (K_i, M) IoU) for image i of the batch; forward returns what it returns.
Refine = Callable[[Callable[..., tuple[torch.Tensor, torch.Tensor]]], Any]


def decode_each_image(
    boxes: list[torch.Tensor],
    decode: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    like: torch.Tensor,
    low_res_size: int,
    return_iou: bool,
) -> PerImageOutputs:
    """Decode each image's boxes: [ (K_i, 1, h, h) logits ] (and [ (K_i,) predicted IoU ]).

    ``decode(i, boxes_i)`` -> ((K_i, 1, h, h) logits, (K_i, M) IoU) for image i's (K_i, 4)
    boxes; an image without boxes gets empty outputs of ``like``'s dtype and device, h =
    ``low_res_size``.
    """
    outputs, ious = [], []
    for i, image_boxes in enumerate(boxes):
        if len(image_boxes) == 0:
            outputs.append(like.new_zeros((0, 1, low_res_size, low_res_size)))
            ious.append(like.new_zeros((0,)))
            continue
        low_res, iou = decode(i, image_boxes)
        outputs.append(low_res)
        ious.append(iou[:, 0])
    return (outputs, ious) if return_iou else outputs


class BoxPromptedSegmenter(nn.Module):
    """HRMedSegSAM for training: normalised images and per-image boxes -> low-res mask logits.

    forward(images (B, 3, S, S), boxes [ (K_i, 4) xyxy in input pixels ]) ->
    [ (K_i, 1, S/4, S/4) logits ] (SAM's mask decoder output, single-mask mode, with the model's
    box prior added as at inference); with ``return_iou=True`` also [ (K_i,) predicted IoU ].
    The prompt encoder's geometry is set to S; the saved model keeps SAM's 1024 (only buffers
    derived from S change, no weights).

    ``frozen_fast = True`` (``--train-only iou-head``, where nothing but the IoU head trains):
    the encoder and the mask decoder run without gradient, the decoder as the engine's
    ``FastMaskDecoder`` (the same logits to rounding, about 5x less work per box on a CPU);
    only the IoU head is applied with gradient, to the IoU token the decoder computed.
    """

    def __init__(self, sam: nn.Module, input_size: int, box_prior: str = "none") -> None:
        super().__init__()
        self.sam = sam
        self.input_size = input_size
        self.box_prior = box_prior  # "none" or "ellipse" (models/box_prior.py); saved with the model
        self.frozen_fast = False
        self._fast_decoder: list = []  # built on first use; a list keeps it out of the state dict

    def _decode_frozen_fast(self, embedding: torch.Tensor, dense_pe: torch.Tensor, sparse: torch.Tensor,
                            dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen decoder's (K, 1, h, w) logits (no gradient) and its IoU head's (K, 1) output (with gradient)."""
        decoder = self.sam.mask_decoder
        if not self._fast_decoder or next(iter(self._fast_decoder[0].buffers())).device != embedding.device:
            self._fast_decoder[:] = [FastMaskDecoder.from_sam(decoder, self.sam.prompt_encoder)]
        fast = self._fast_decoder[0]
        tokens: list[torch.Tensor] = []
        hook = decoder.iou_prediction_head.register_forward_hook(lambda m, args, out: tokens.append(args[0]))
        try:
            with torch.no_grad():
                fast.prepare(embedding.detach(), dense_pe)
                out = fast.predict(sparse.detach(), dense.detach(), None, multimask_output=False)
        finally:
            hook.remove()
        # The single-mask output is mask token 0, whose score is the head's first output.
        return out.masks, decoder.iou_prediction_head(torch.cat(tokens))[:, :1]

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor], return_iou: bool = False,
                refine: Refine | None = None) -> PerImageOutputs | Any:
        pe = self.sam.prompt_encoder
        grid = self.input_size // 16
        set_prompt_geometry(pe, self.input_size)
        with torch.no_grad() if self.frozen_fast else nullcontext():
            embeddings = self.sam.image_encoder(images)

        def decode(i: int, image_boxes: torch.Tensor, **prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            if self.frozen_fast:
                sparse, dense = sam_box_prompt(pe, image_boxes)
                low_res, iou = self._decode_frozen_fast(embeddings[i : i + 1], pe.get_dense_pe(), sparse, dense)
            else:
                # SAM's decoder repeats one image's embedding for each prompt, hence one image at a time.
                low_res, iou = decode_sam_boxes(pe, self.sam.mask_decoder, embeddings[i : i + 1], image_boxes, **prompts)
            return add_box_prior(low_res, image_boxes, (self.input_size,) * 2, self.box_prior), iou

        if refine is not None:
            return refine(decode)
        return decode_each_image(boxes, decode, embeddings, 4 * grid, return_iou)


class Sam2BoxPromptedSegmenter(nn.Module):
    """HRMedSegSAM2 for training: images and per-image boxes -> low-res mask logits.

    forward(images (B, 3, S, S) normalised as SAM2ImagePredictor does (ImageNet statistics;
    ``HRMedSegSam2ImageEncoder`` re-normalises for its encoder), boxes [ (K_i, 4) xyxy in input
    pixels ]) -> [ (K_i, 1, S/4, S/4) logits ] (and with ``return_iou=True`` [ (K_i,) predicted
    IoU ] of those masks): SAM2's mask decoder in single-mask mode, fed through
    ``hrmedseg.models.prompting`` (as ``SAM2ImagePredictor.set_image_batch`` + ``_predict``).
    The prompt encoder's geometry is set to S (it has no size-dependent weights); the saved
    model keeps SAM2's 1024.
    """

    def __init__(self, sam: nn.Module, input_size: int, settings: Sam2Settings | None = None) -> None:
        super().__init__()
        self.sam = sam
        self.input_size = input_size
        self.settings = settings  # sam2 config and memory flag, saved with the model

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor], return_iou: bool = False,
                refine: Refine | None = None) -> PerImageOutputs | Any:
        set_prompt_geometry(self.sam.sam_prompt_encoder, self.input_size)
        features = sam2_features(self.sam, images)

        def decode(i: int, image_boxes: torch.Tensor, **prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            return decode_sam2_boxes(self.sam, features.image(i), image_boxes, **prompts)

        if refine is not None:
            return refine(decode)
        return decode_each_image(boxes, decode, features.image_embed, self.input_size // 4, return_iou)


__all__ = ["BoxPromptedSegmenter", "Sam2BoxPromptedSegmenter", "decode_each_image"]
