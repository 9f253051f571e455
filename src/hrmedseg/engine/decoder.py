"""The two model steps the engine calls, each behind one small class so either can be swapped.

- :class:`SamImageEncoder`: a crop in 0..255 RGB (1, 3, h, w), h, w <= input size -> the image
  embedding (1, 256, 64, 64); normalises with the model's ``pixel_mean``/``pixel_std`` and pads
  bottom/right with zeros after normalisation, exactly as ``Sam.preprocess``.
- :class:`SamBoxDecoder`: an embedding and N boxes in crop-input pixels -> low-res mask logits
  (N, 1, 256, 256) and predicted IoU scores (N,), one mask per box (SAM's single-mask output,
  which SamPredictor also uses for box prompts). A faster decoder only has to match this call.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class BoxDecoder(Protocol):
    def __call__(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class SamImageEncoder:
    """Wraps a segment_anything ``Sam``-like model's image encoder."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.input_size = int(model.image_encoder.img_size)

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """image: (1, 3, h, w) float 0..255, h, w <= input_size -> (1, 256, S/16, S/16)."""
        device = self.model.pixel_mean.device
        x = (image.to(device) - self.model.pixel_mean) / self.model.pixel_std
        h, w = x.shape[-2:]
        x = F.pad(x, (0, self.input_size - w, 0, self.input_size - h))
        return self.model.image_encoder(x)


class SamBoxDecoder:
    """SAM's prompt encoder + mask decoder for box prompts, batched over boxes."""

    def __init__(self, model: nn.Module, multimask: bool = False) -> None:
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.multimask = multimask

    @torch.inference_mode()
    def __call__(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (1, 256, 64, 64); boxes (N, 4) xyxy input px -> logits (N, 1, 256, 256), scores (N,)."""
        boxes = boxes.to(embedding.device, torch.float32)
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        logits, iou = self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask,
        )
        if self.multimask:  # keep the best of the three, as SamAutomaticMaskGenerator does
            best = iou.argmax(dim=1)
            idx = torch.arange(len(best), device=best.device)
            return logits[idx, best][:, None], iou[idx, best]
        return logits, iou[:, 0]
