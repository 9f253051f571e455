"""SAM-compatible neck and the LGViT + neck image encoder (the HRMedSegSAM backbone)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import LayerNorm2d
from .lgvit import LGViT
from .preprocessing import Preprocessing


class SamNeck(nn.Sequential):
    """(B, C, h, w) -> (B, out_chans, h, w): 1x1 conv, LN2d, 3x3 conv, LN2d (as in SAM's ViT)."""

    def __init__(self, in_chans: int = 96, out_chans: int = 256) -> None:
        super().__init__(
            nn.Conv2d(in_chans, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of an LGViT + neck encoder; stored in our checkpoints' metadata."""

    embed_dim: int = 96
    conv_depth: int = 2
    depths: tuple[int, ...] = (2, 6, 2)
    num_heads: tuple[int, ...] = (6, 12, 24)
    mlp_ratio: float = 2.0
    out_chans: int = 256
    img_size: int = 1024

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class HRMedSegEncoder(nn.Module):
    """LGViT + SAM neck: a normalised (B, 3, H, W) image -> (B, 256, H/16, W/16) embedding.

    Drop-in for SAM's ``image_encoder`` (it has ``img_size``); ``preprocessing`` tells callers how
    to normalise pixels for these weights.
    """

    def __init__(self, config: EncoderConfig | None = None, preprocessing: Preprocessing | None = None) -> None:
        super().__init__()
        self.config = config or EncoderConfig()
        self.preprocessing = preprocessing or Preprocessing.sam()
        self.img_size = self.config.img_size
        c = self.config
        self.image_encoder = LGViT(c.embed_dim, c.conv_depth, c.depths, c.num_heads, c.mlp_ratio)
        self.neck = SamNeck(c.embed_dim, c.out_chans)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_encoder.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.image_encoder(x))
