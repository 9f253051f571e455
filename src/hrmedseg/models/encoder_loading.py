"""Build LGViT + neck encoders and load their weights from any supported file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch

from ..weights.bundle import WeightsError, save_bundle
from ..weights.checkpoint import Checkpoint, read_checkpoint
from .neck import EncoderConfig, HRMedSegEncoder
from .preprocessing import Preprocessing
from .state_dict import load_matching

ENCODER_ARCHITECTURE = "lgvit_neck"


def infer_encoder_config(state_dict: Mapping[str, torch.Tensor], source: str) -> EncoderConfig:
    """Read width and depths off the authors' key layout (heads keep the paper's defaults)."""
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state_dict:
        raise WeightsError(
            f"{source} is not an LGViT + neck checkpoint: it has no '{key}' "
            f"(first keys: {', '.join(list(state_dict)[:3])})"
        )
    embed_dim = state_dict[key].shape[0]
    blocks: dict[int, set[int]] = {}
    for k in state_dict:
        m = re.match(r"image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    stages = [len(blocks[i]) for i in sorted(blocks)]
    if len(stages) < 2:
        raise WeightsError(f"{source}: cannot find LGViT stages in its keys")
    out_chans = state_dict["neck.0.weight"].shape[0] if "neck.0.weight" in state_dict else 256
    default = EncoderConfig()
    heads = default.num_heads if len(stages) - 1 == len(default.num_heads) else tuple([6] * (len(stages) - 1))
    return EncoderConfig(
        embed_dim=embed_dim, conv_depth=stages[0], depths=tuple(stages[1:]), num_heads=heads, out_chans=out_chans
    )


def build_encoder(config: EncoderConfig | None = None, preprocessing: Preprocessing | None = None) -> HRMedSegEncoder:
    """A randomly initialised LGViT + neck (paper defaults: C = 96, L = 10)."""
    return HRMedSegEncoder(config, preprocessing)


def resolve_encoder(encoder: HRMedSegEncoder | str | os.PathLike | None) -> HRMedSegEncoder:
    """An encoder given as a module, as a path to its weights, or None (a random paper-size one)."""
    if encoder is None:
        return build_encoder()
    if isinstance(encoder, HRMedSegEncoder):
        return encoder
    if isinstance(encoder, (str, os.PathLike)):
        return load_encoder(encoder)
    raise TypeError(f"encoder must be an HRMedSegEncoder, a path or None, not {type(encoder).__name__}")


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> HRMedSegEncoder:
    """Build LGViT + neck and load weights from ``path``, in eval mode.

    Accepts the authors' checkpoint (``SAM_PFD_10K.pth``, plain or with DataParallel's
    ``module.`` prefix; its pixel normalisation quirk is applied) and our bundles. The module
    maps a normalised (B, 3, H, W) tensor, H and W multiples of 16, to (B, 256, H/16, W/16);
    ``encoder.preprocessing`` says how to normalise.
    """
    return encoder_from_checkpoint(read_checkpoint(path), device)


def encoder_from_checkpoint(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> HRMedSegEncoder:
    """:func:`load_encoder` for a file already read (an "lgvit_neck" bundle or the authors' release)."""
    source = checkpoint.source
    if checkpoint.is_bundle:
        if checkpoint.kind != ENCODER_ARCHITECTURE:
            raise WeightsError(f"{source} holds a '{checkpoint.kind}' model, not an LGViT + neck encoder")
        config = EncoderConfig.from_dict(checkpoint.config)
        preprocessing = Preprocessing.recorded(checkpoint.preprocessing)
    else:
        if not checkpoint.state:
            raise WeightsError(f"{source} holds no state dict of tensors")
        config = infer_encoder_config(checkpoint.state, source)
        preprocessing = Preprocessing.hrmedseg_release()
    encoder = HRMedSegEncoder(config, preprocessing)
    load_matching(encoder, checkpoint.state, source)
    return encoder.eval().to(device)


def save_encoder(encoder: HRMedSegEncoder, path: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Save an encoder as an hrmedseg bundle (atomic)."""
    return save_bundle(
        path,
        ENCODER_ARCHITECTURE,
        encoder.state_dict(),
        config=encoder.config.to_dict(),
        preprocessing=encoder.preprocessing.to_dict(),
        provenance=provenance,
    )
