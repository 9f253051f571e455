"""HRMedSegSAM: segment-anything's ``Sam`` with the LGViT + neck encoder in place of its ViT.

SAM's prompt encoder and mask decoder have the same shapes in every SAM variant (prompt width
256, a 64 x 64 image embedding, 1024 x 1024 input), so they come from any SAM ViT-H/L/B file
(``sam_vit_h_4b8939.pth`` ...) or from our compact "sam_prompt_decoder" bundle. The result is a
plain ``segment_anything.modeling.Sam``: ``segment_anything.SamPredictor(model)`` works as is,
and the model normalises pixels with the statistics its encoder weights were trained with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..weights.bundle import WeightsError, save_bundle
from ..weights.checkpoint import (
    Checkpoint,
    extract_sam_decoder_state,
    read_checkpoint,
    sam_variant,
)
from .encoder_loading import resolve_encoder
from .info import LoadedModel, ModelMetadata
from .neck import EncoderConfig, HRMedSegEncoder
from .preprocessing import Preprocessing
from .prior_gate import find_prior_gate
from .sidecar import find_sidecar
from .state_dict import load_matching

SAM_DECODER_ARCHITECTURE = "sam_prompt_decoder"
HRMEDSEG_SAM_ARCHITECTURE = "hrmedseg_sam"

# SAM's fixed prompt/decoder geometry (segment_anything.build_sam._build_sam).
PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
EMBEDDING_SIZE = IMAGE_SIZE // 16


def build_sam_prompt_decoder() -> tuple[nn.Module, nn.Module]:
    """SAM's ``PromptEncoder`` and ``MaskDecoder``, randomly initialised, as ``_build_sam`` makes them."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
        input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def _decoder_container(prompt_encoder: nn.Module, mask_decoder: nn.Module) -> nn.Module:
    """A module whose state-dict keys are ``prompt_encoder.*`` and ``mask_decoder.*``, as in SAM files."""
    return nn.ModuleDict({"prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder})


def check_sam_decoder_state(decoder: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The tensors of SAM's prompt encoder and mask decoder, each present with SAM's shape.

    Args:
        decoder: what :func:`hrmedseg.weights.checkpoint.extract_sam_decoder_state` kept.
        source: the file (or name) it came from, for error messages.

    Returns:
        {name: tensor} for exactly the keys of SAM's ``PromptEncoder`` and ``MaskDecoder``.

    Raises:
        WeightsError: naming ``source`` when a tensor is missing or has another shape than SAM's.
    """
    expected = _decoder_container(*build_sam_prompt_decoder()).state_dict()
    missing = [k for k in expected if k not in decoder]
    mismatched = [
        f"{k}: file {tuple(decoder[k].shape)} vs SAM {tuple(v.shape)}"
        for k, v in expected.items()
        if k in decoder and decoder[k].shape != v.shape
    ]
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if mismatched:
            detail.append(f"{len(mismatched)} of another shape (e.g. {'; '.join(mismatched[:3])})")
        raise WeightsError(f"{source} does not hold SAM's prompt encoder and mask decoder: " + ", ".join(detail))
    return {k: decoder[k] for k in expected}


def sam_decoder_from_checkpoint(checkpoint: Checkpoint, source: str | None = None) -> dict[str, torch.Tensor]:
    """The SAM prompt encoder + mask decoder tensors of a read SAM checkpoint or bundle.

    Accepts a SAM state dict, a "sam_prompt_decoder" bundle or an "hrmedseg_sam" bundle (whose
    decoder is reused); anything else raises a WeightsError naming ``source`` (default: the file).
    """
    source = source or checkpoint.source
    if checkpoint.is_bundle and checkpoint.kind not in (SAM_DECODER_ARCHITECTURE, HRMEDSEG_SAM_ARCHITECTURE):
        raise WeightsError(
            f"{source} holds a '{checkpoint.kind}' bundle; expected a SAM decoder "
            f"('{SAM_DECODER_ARCHITECTURE}' bundle or a SAM checkpoint such as sam_vit_h_4b8939.pth)"
        )
    return check_sam_decoder_state(extract_sam_decoder_state(checkpoint.state, source), source)


def read_sam_decoder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The SAM prompt encoder + mask decoder tensors of a SAM checkpoint or a "sam_prompt_decoder" bundle."""
    return sam_decoder_from_checkpoint(read_checkpoint(path))


def build_hrmedseg_sam(
    encoder: HRMedSegEncoder | str | os.PathLike | None = None,
    decoder: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
):
    """HRMedSegSAM: SAM with our LGViT + neck as its image encoder, in eval mode.

    Args:
        encoder: an ``HRMedSegEncoder``, a path to its weights (authors' checkpoint or our
            "lgvit_neck" bundle), or None for a random paper-size encoder.
        decoder: a SAM checkpoint (ViT-H/L/B, plain state dict), a "sam_prompt_decoder" bundle,
            an already extracted decoder state dict, or None for a random decoder.
        device: where the model goes.

    Returns:
        ``segment_anything.modeling.Sam`` whose ``pixel_mean``/``pixel_std`` are the encoder's
        normalisation; ``SamPredictor(model)`` maps an HWC uint8 image to a (1, 256, 64, 64)
        embedding and box prompts to masks.
    """
    if decoder is None:
        state, source = None, ""
    elif isinstance(decoder, Mapping):
        source = "the given decoder state dict"
        state = check_sam_decoder_state(extract_sam_decoder_state(decoder, source), source)
    else:
        state, source = read_sam_decoder(decoder), str(decoder)
    return assemble_hrmedseg_sam(resolve_encoder(encoder), state, source).to(device)


def assemble_hrmedseg_sam(
    image_encoder: HRMedSegEncoder, decoder_state: Mapping[str, torch.Tensor] | None, source: str = ""
):
    """Sam from an encoder and extracted decoder tensors (None: random), in eval mode on the CPU."""
    from segment_anything.modeling import Sam

    prompt_encoder, mask_decoder = build_sam_prompt_decoder()
    if decoder_state is not None:
        load_matching(_decoder_container(prompt_encoder, mask_decoder), decoder_state, source)
    preprocessing = image_encoder.preprocessing
    model = Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(preprocessing.pixel_mean),
        pixel_std=list(preprocessing.pixel_std),
    )
    return model.eval()


def save_hrmedseg_sam(
    model, path: str | os.PathLike, provenance: dict | None = None, box_prior: str = "none",
    max_upscale: float | None = None,
) -> Path:
    """Save a complete HRMedSegSAM (encoder + SAM prompt encoder/decoder) as one "hrmedseg_sam" bundle.

    ``box_prior`` ("none" or "ellipse") is the shape prior the model was trained with;
    ``max_upscale`` the crop enlargement it was made for (``ModelMetadata.max_upscale``). The bundle
    keeps the encoder's architecture and pixel normalisation, so ``load_model`` rebuilds the same
    model with nothing else to know.
    """
    encoder = model.image_encoder
    if not isinstance(encoder, HRMedSegEncoder):
        raise TypeError(f"not an HRMedSegSAM: its image encoder is a {type(encoder).__name__}")
    return save_bundle(
        path,
        HRMEDSEG_SAM_ARCHITECTURE,
        model.state_dict(),
        config={"encoder": encoder.config.to_dict(), "box_prior": box_prior,
                **({"max_upscale": float(max_upscale)} if max_upscale else {})},
        preprocessing=encoder.preprocessing.to_dict(),
        provenance=provenance,
    )


#: The JSON beside a weights file with its click fix (``ModelMetadata.click_fix``).
CLICK_FIX_SUFFIX = ".click_fix.json"


def click_fix_fields(weights_path, config: Mapping[str, Any]) -> dict[str, Any]:
    """``ModelMetadata`` keywords for a model's click fix record, where it has one."""
    found = find_sidecar(weights_path, config, "click_fix", CLICK_FIX_SUFFIX)
    return {} if found is None else {"click_fix": dict(found[0]), "click_fix_source": found[1]}


def hrmedseg_sam_from_checkpoint(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild an HRMedSegSAM from a read "hrmedseg_sam" bundle, in eval mode on ``device``.

    Returns:
        ``LoadedModel(Sam, metadata)``; ``metadata.box_prior`` is the prior our engine adds to
        the decoder's (B, 1, 256, 256) low-res logits (see models/box_prior.py).
    """
    checkpoint.require_bundle(HRMEDSEG_SAM_ARCHITECTURE)
    config = EncoderConfig.from_dict(checkpoint.config.get("encoder", {}))
    preprocessing = Preprocessing.recorded(checkpoint.preprocessing)
    model = build_hrmedseg_sam(HRMedSegEncoder(config, preprocessing))
    load_matching(model, checkpoint.state, checkpoint.source)
    metadata = ModelMetadata(
        kind=HRMEDSEG_SAM_ARCHITECTURE,
        source=checkpoint.source,
        provenance=checkpoint.provenance,
        input_size=IMAGE_SIZE,
        box_prior=checkpoint.config.get("box_prior", "none"),
        max_upscale=checkpoint.config.get("max_upscale"),
        prior_gate=find_prior_gate(checkpoint.path, checkpoint.config),
        **click_fix_fields(checkpoint.path, checkpoint.config),
    )
    return LoadedModel(model.eval().to(device), metadata)


def load_hrmedseg_sam(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load an "hrmedseg_sam" bundle written by ``save_hrmedseg_sam``: its ``Sam`` (see :func:`hrmedseg_sam_from_checkpoint` for its metadata)."""
    return hrmedseg_sam_from_checkpoint(read_checkpoint(path), device).module


__all__ = [
    "build_hrmedseg_sam",
    "extract_sam_decoder_state",
    "read_sam_decoder",
    "sam_decoder_from_checkpoint",
    "check_sam_decoder_state",
    "hrmedseg_sam_from_checkpoint",
    "assemble_hrmedseg_sam",
    "sam_variant",
    "save_hrmedseg_sam",
    "load_hrmedseg_sam",
]
