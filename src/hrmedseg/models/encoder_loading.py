"""Build LGViT + neck encoders and load their weights from any supported file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..weights.bundle import WeightsError, is_bundle, read_checkpoint, save_bundle
from .neck import EncoderConfig, HRMedSegEncoder
from .preprocessing import Preprocessing
from .state_dict import load_matching, strip_prefix

ENCODER_ARCHITECTURE = "lgvit_neck"


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the tensors in a raw checkpoint: a bare state dict, or one under 'model'/'state_dict'."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source} holds no state dict of tensors")
    return strip_prefix(obj, "module.")


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


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> HRMedSegEncoder:
    """Build LGViT + neck and load weights from ``path``, in eval mode.

    Accepts the authors' checkpoint (``SAM_PFD_10K.pth``, plain or with DataParallel's
    ``module.`` prefix; its pixel normalisation quirk is applied) and our bundles. The module
    maps a normalised (B, 3, H, W) tensor, H and W multiples of 16, to (B, 256, H/16, W/16);
    ``encoder.preprocessing`` says how to normalise.
    """
    source = str(path)
    obj = read_checkpoint(path)
    if is_bundle(obj):
        if obj["architecture"] != ENCODER_ARCHITECTURE:
            raise WeightsError(f"{source} holds a '{obj['architecture']}' model, not an LGViT + neck encoder")
        config = EncoderConfig.from_dict(obj["config"])
        preprocessing = Preprocessing.from_dict(obj["preprocessing"]) if obj["preprocessing"] else Preprocessing.sam()
        state_dict = obj["state_dict"]
    else:
        state_dict = unwrap_state_dict(obj, source)
        config = infer_encoder_config(state_dict, source)
        preprocessing = Preprocessing.hrmedseg_release()
    encoder = HRMedSegEncoder(config, preprocessing)
    load_matching(encoder, state_dict, source)
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
