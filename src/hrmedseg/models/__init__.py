"""HRMedSeg models: the LGViT + neck encoder, the ECM-Decoder model, and SAM/SAM2 hybrids.

Public API (imported lazily, so ``import hrmedseg.models`` stays cheap):

- ``build_encoder(config=None)`` / ``load_encoder(path)``: LGViT + neck,
  normalised (B, 3, H, W) -> (B, 256, H/16, W/16).
- ``build_hrmedseg(num_classes)`` / ``load_hrmedseg(path)``: prompt-free HRMedSeg,
  (B, 3, H, W) -> (B, num_classes, H, W) logits.
- ``build_hrmedseg_sam(...)``: segment-anything's ``Sam`` with our encoder.
- ``build_hrmedseg_sam2(...)``: sam2's ``SAM2Base`` with our encoder.
- ``load_model(name_or_path)``: any of the above from a registry name or a file;
  ``load_model_with_metadata`` returns ``LoadedModel(module, ModelMetadata)`` (provenance,
  input size, box prior, sam2 settings).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EncoderConfig": ".neck",
    "HRMedSegEncoder": ".neck",
    "LGViT": ".lgvit",
    "Preprocessing": ".preprocessing",
    "build_encoder": ".encoder_loading",
    "load_encoder": ".encoder_loading",
    "save_encoder": ".encoder_loading",
    "HRMedSeg": ".hrmedseg_model",
    "ECMDecoder": ".ecm_decoder",
    "build_hrmedseg": ".hrmedseg_model",
    "load_hrmedseg": ".hrmedseg_model",
    "save_hrmedseg": ".hrmedseg_model",
    "build_hrmedseg_sam": ".sam",
    "build_hrmedseg_sam2": ".sam2",
    "save_hrmedseg_sam": ".sam",
    "load_hrmedseg_sam": ".sam",
    "save_hrmedseg_sam2": ".sam2",
    "Sam2Neck": ".sam2",
    "HRMedSegSam2ImageEncoder": ".sam2",
    "extract_sam_decoder_state": ".sam",
    "extract_sam2_decoder_state": ".sam2",
    "load_hrmedseg_sam2": ".sam2",
    "load_model": ".loading",
    "import_checkpoint": ".importing",
    "resolve_weights": ".importing",
    "load_model_with_metadata": ".loading",
    "LoadedModel": ".info",
    "ModelMetadata": ".info",
    "Sam2Settings": ".info",
    "build_hrmedseg_sam2_with_metadata": ".sam2",
    "FastHRMedSegEncoder": ".fast_encoder",
    "FastMaskDecoder": ".fast_decoder",
    "FastSamBoxDecoder": ".fast_decoder",
    "select_backend": ".runtime",
}

__all__ = sorted(_EXPORTS)

# Before any model module imports segment_anything: skip its torchvision-importing __init__.
from .sam_package import register_light_package  # noqa: E402

register_light_package()


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hrmedseg.models' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
