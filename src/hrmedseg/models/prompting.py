"""Prompts into SAM and SAM2 decoders: the one path the engine and fine-tuning both take.

A prompt is, per object, an optional box (N, 4) xyxy, optional points (N, P, 2) xy with labels
(N, P) (1 positive, 0 negative, as SAM), and an optional low-res mask prompt (N, 1, S/4, S/4),
the logits of an earlier prediction (SAM's ``mask_input``); all in the model's input pixels.

- SAM (a segment_anything ``Sam``-like model: ``prompt_encoder``, ``mask_decoder``):
  :func:`sam_prompt` embeds them as ``SamPredictor.predict_torch`` does (points, then the box;
  without a box SAM's prompt encoder pads one "not a point" token), :func:`sam_box_prompt` is
  its box-only case, :func:`decode_sam_boxes` runs the mask decoder on one image's embedding
  for N objects.
- SAM2 (a sam2 ``SAM2Base``): :func:`sam2_features` computes what ``SAM2ImagePredictor.set_image``
  computes (``forward_image``, ``_prepare_backbone_features``, ``no_mem_embed`` added to the 1/16
  level), :func:`sam2_prompt` embeds prompts as ``SAM2ImagePredictor._predict`` does (a box is
  two corner points labelled 2 and 3, put before the clicks), :func:`sam2_box_prompt` is its
  box-only case, :func:`decode_sam2_boxes` runs its mask decoder for N objects.
- :func:`set_prompt_geometry` / :func:`prompt_geometry`: the input size the prompt encoder
  scales box coordinates for (training runs at any size S; saved models keep 1024).

Models trained with a shape prior add it to the decoder's low-res logits with
``hrmedseg.models.box_prior.add_box_prior(logits, boxes, (S, S), box_prior)``; callers pass the
prior's name, read from wherever the model's metadata is kept.

Nothing here switches gradients off: the engine calls these under ``inference_mode``/``no_grad``,
training with gradients.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import nn

# SAM2's point labels for the two corners of a box (SAM2ImagePredictor._prep_prompts).
SAM2_BOX_CORNER_LABELS = (2, 3)


class Sam2Features(NamedTuple):
    """A SAM2 model's image features for its mask decoder (``SAM2ImagePredictor._features``).

    ``image_embed`` (B, C, S/16, S/16) with ``no_mem_embed`` added (models with
    ``directly_add_no_mem_embed``); ``high_res_feats`` ((B, C/8, S/4, S/4), (B, C/4, S/8, S/8)),
    the 1/4 and 1/8 levels after the mask decoder's ``conv_s0`` / ``conv_s1`` (empty for models
    without ``use_high_res_features_in_sam``). C = 256 for SAM2.
    """

    image_embed: torch.Tensor
    high_res_feats: tuple[torch.Tensor, ...]

    def image(self, index: int) -> "Sam2Features":
        """The features of image ``index`` of the batch (batch size 1)."""
        return Sam2Features(self.image_embed[index : index + 1], tuple(h[index : index + 1] for h in self.high_res_feats))


def set_prompt_geometry(prompt_encoder: nn.Module, input_size: int, stride: int = 16) -> None:
    """Make ``prompt_encoder`` (SAM's or SAM2's) scale box coordinates for an S x S input, S = ``input_size``.

    Only buffers derived from the size change (neither prompt encoder has size-dependent weights).
    """
    prompt_encoder.input_image_size = (input_size, input_size)
    prompt_encoder.image_embedding_size = (input_size // stride, input_size // stride)


@contextmanager
def prompt_geometry(prompt_encoder: nn.Module, input_size: int, stride: int = 16) -> Iterator[None]:
    """:func:`set_prompt_geometry` for the duration of a ``with`` block, then the geometry it had."""
    before = prompt_encoder.input_image_size, prompt_encoder.image_embedding_size
    set_prompt_geometry(prompt_encoder, input_size, stride)
    try:
        yield
    finally:
        prompt_encoder.input_image_size, prompt_encoder.image_embedding_size = before


def prompt_tensors(
    device: torch.device,
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    mask_inputs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """The prompts on ``device`` as keywords (coordinates and logits float32, labels int).

    Points without labels are all positive (label 1).
    """
    if points is not None and point_labels is None:
        point_labels = torch.ones(points.shape[:2], dtype=torch.int)
    prompts = dict(boxes=boxes, points=points, point_labels=point_labels, mask_inputs=mask_inputs)
    return {
        k: None if v is None else torch.as_tensor(v).to(device, torch.int if k == "point_labels" else torch.float32)
        for k, v in prompts.items()
    }


# --------------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------------


def sam_prompt(
    prompt_encoder: nn.Module,
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    mask_inputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's (sparse (N, T, C), dense (N, C, S/16, S/16)) prompt embeddings for N objects.

    boxes (N, 4) xyxy and points (N, P, 2) xy input px, point_labels (N, P) (1, 0; -1 pads),
    mask_inputs (N, 1, S/4, S/4) logits; any may be None (not all). T = P + 2 with a box,
    P + 1 without (SAM pads a "not a point" token), 2 for a box alone.
    """
    pts = None if points is None else (points, point_labels)
    return prompt_encoder(points=pts, boxes=boxes, masks=mask_inputs)


def sam_box_prompt(prompt_encoder: nn.Module, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """boxes (N, 4) xyxy input px -> SAM's (sparse (N, 2, C), dense (N, C, S/16, S/16)) prompt embeddings."""
    return sam_prompt(prompt_encoder, boxes)


def decode_sam_boxes(
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    embedding: torch.Tensor,
    boxes: torch.Tensor | None,
    multimask: bool = False,
    points: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    mask_inputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder for N objects on one image.

    embedding (1, C, S/16, S/16); boxes (N, 4) xyxy input px, points/point_labels/mask_inputs
    as :func:`sam_prompt` -> logits (N, M, S/4, S/4) and predicted IoU (N, M), M = 1
    (single-mask output) or 3 (``multimask``).
    """
    sparse, dense = sam_prompt(prompt_encoder, boxes, points, point_labels, mask_inputs)
    return mask_decoder(
        image_embeddings=embedding,
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )



def decode_sam_points(
    prompt_encoder: nn.Module, mask_decoder: nn.Module, embedding: torch.Tensor, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder for N single positive points on one image (the automatic mask generator's prompt).

    embedding (1, C, S/16, S/16); points (N, 2) xy input px -> logits (N, 3, S/4, S/4) and
    predicted IoU (N, 3): SAM's three multimask outputs, as ``SamAutomaticMaskGenerator`` asks.
    """
    labels = torch.ones(points.shape[0], 1, dtype=torch.int, device=points.device)
    return decode_sam_boxes(prompt_encoder, mask_decoder, embedding, None, multimask=True, points=points[:, None, :], point_labels=labels)

# --------------------------------------------------------------------------------------------
# SAM2
# --------------------------------------------------------------------------------------------


def sam2_features(model: nn.Module, images: torch.Tensor) -> Sam2Features:
    """images (B, 3, S, S), normalised for the model's image encoder -> :class:`Sam2Features`."""
    backbone_out = model.forward_image(images)
    _, feats, _, sizes = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        feats[-1] = feats[-1] + model.no_mem_embed
    batch = images.shape[0]
    # (h*w, B, C) -> (B, C, h, w), finest level first
    maps = [f.permute(1, 2, 0).reshape(batch, -1, *size) for f, size in zip(feats, sizes)]
    high_res = tuple(maps[:-1]) if model.use_high_res_features_in_sam else ()
    return Sam2Features(maps[-1], high_res)


def sam2_prompt(
    prompt_encoder: nn.Module,
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    mask_inputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM2's (sparse (N, T, C), dense (N, C, S/16, S/16)) prompt embeddings for N objects.

    Inputs as :func:`sam_prompt`. As ``SAM2ImagePredictor._predict``: a box is two points,
    top-left labelled 2 and bottom-right labelled 3, put before the clicks; everything goes in
    as points (SAM2's prompt encoder then pads one "not a point" token).
    """
    coords, labels = [], []
    if boxes is not None:
        corners = boxes.reshape(-1, 2, 2)
        coords.append(corners)
        labels.append(torch.tensor([SAM2_BOX_CORNER_LABELS], dtype=torch.int, device=corners.device).repeat(len(corners), 1))
    if points is not None:
        coords.append(points)
        labels.append(point_labels.to(points.device, torch.int))
    return prompt_encoder(points=(torch.cat(coords, dim=1), torch.cat(labels, dim=1)), boxes=None, masks=mask_inputs)


def sam2_box_prompt(prompt_encoder: nn.Module, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """boxes (N, 4) xyxy input px -> SAM2's (sparse (N, 2, C), dense (N, C, S/16, S/16)) prompt embeddings."""
    return sam2_prompt(prompt_encoder, boxes)


def decode_sam2_boxes(
    model: nn.Module,
    features: Sam2Features,
    boxes: torch.Tensor | None,
    multimask: bool = False,
    points: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    mask_inputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM2's mask decoder for N objects on one image's features (batch size 1).

    boxes (N, 4) xyxy input px and the rest as :func:`sam2_prompt`, cast to the embedding's
    dtype -> logits (N, M, S/4, S/4) and predicted IoU (N, M), M = 1 or 3 (``multimask``). In
    eval mode sam2's decoder replaces an unstable single mask by the best multimask output
    (``dynamic_multimask_via_stability``).
    """
    embed = features.image_embed
    prompt_encoder = model.sam_prompt_encoder

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(embed.device, embed.dtype)

    sparse, dense = sam2_prompt(prompt_encoder, cast(boxes), cast(points), point_labels, cast(mask_inputs))
    logits, iou, _, _ = model.sam_mask_decoder(
        image_embeddings=embed,
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        repeat_image=True,  # one image's features for all N objects
        high_res_features=list(features.high_res_feats) or None,
    )
    return logits, iou


__all__ = [
    "SAM2_BOX_CORNER_LABELS",
    "Sam2Features",
    "decode_sam2_boxes",
    "decode_sam_boxes",
    "decode_sam_points",
    "prompt_geometry",
    "prompt_tensors",
    "sam2_box_prompt",
    "sam2_features",
    "sam2_prompt",
    "sam_box_prompt",
    "sam_prompt",
    "set_prompt_geometry",
]
