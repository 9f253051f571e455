"""Turn a checkpoint the user downloaded into a compact hrmedseg bundle.

Recognised inputs (by their keys, not their file names):

- SAM (segment-anything) checkpoint: a plain state dict with ``image_encoder.*``,
  ``prompt_encoder.*`` and ``mask_decoder.*``. Only the prompt encoder and mask decoder are
  kept (about 16 MB of the 0.4 to 2.5 GB file): architecture ``sam_prompt_decoder``.
- SAM2 / SAM2.1 checkpoint: ``{"model": {...}}`` with ``sam_prompt_encoder.*``,
  ``sam_mask_decoder.*`` and ``image_encoder.trunk.*``: the decoder part, extracted by
  :func:`hrmedseg.models.sam2.extract_sam2_decoder_state`: architecture ``sam2_prompt_decoder``.
- The HRMedSeg authors' LGViT + neck checkpoint (``SAM_PFD_10K.pth``): architecture ``lgvit_neck``.
- An hrmedseg bundle: validated and copied.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from ..atomic import atomic_path
from ..errors import WeightsError
from .bundle import is_bundle, read_checkpoint, save_bundle

log = logging.getLogger(__name__)

SAM_PROMPT_DECODER = "sam_prompt_decoder"
SAM2_PROMPT_DECODER = "sam2_prompt_decoder"
LGVIT_NECK = "lgvit_neck"
SAM_KEPT_PREFIXES = ("prompt_encoder.", "mask_decoder.")
# SAM's image encoder width identifies the variant (segment_anything.build_sam).
SAM_VARIANT_BY_WIDTH = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}
SAM_LICENCE = "Apache-2.0"

EXPECTED_KEYS_TEXT = (
    "a SAM checkpoint (keys image_encoder.*, prompt_encoder.*, mask_decoder.*), a SAM2/SAM2.1 checkpoint "
    "({'model': {...}} with sam_prompt_encoder.*, sam_mask_decoder.*, image_encoder.trunk.*), the HRMedSeg "
    "authors' LGViT checkpoint (image_encoder.layers.*, neck.*) or an hrmedseg bundle"
)


def _has_prefix(keys: Any, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_kind(obj: Any) -> str | None:
    """``"bundle"``, ``"sam"``, ``"sam2"``, ``"lgvit"`` or None for a loaded checkpoint object."""
    if is_bundle(obj):
        return "bundle"
    if not isinstance(obj, Mapping):
        return None
    model = obj.get("model")
    if isinstance(model, Mapping) and _has_prefix(model, "sam_mask_decoder.") and _has_prefix(model, "sam_prompt_encoder."):
        return "sam2"
    state = _tensor_dict(obj)
    if state is None:
        return None
    if _has_prefix(state, "prompt_encoder.") and _has_prefix(state, "mask_decoder.") and _has_prefix(state, "image_encoder."):
        return "sam"
    if _has_prefix(state, "image_encoder.layers.") and _has_prefix(state, "neck."):
        return "lgvit"
    return None


def _tensor_dict(obj: Mapping) -> dict[str, torch.Tensor] | None:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    if all(k.startswith("module.") for k in obj):
        return {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _source_provenance(src: Path, digest: str, holds: str, licence: str) -> dict:
    return {
        "source": src.name,
        "source_sha256": digest,
        "source_size": src.stat().st_size,
        "licence": licence,
        "holds": holds,
        "imported_by": "hrmedseg weights import",
    }


def extract_sam_decoder_state(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Keep only ``prompt_encoder.*`` and ``mask_decoder.*`` of a SAM state dict.

    Returns ``(state_dict, config)``; config is ``{"variant": "vit_h" | "vit_l" | "vit_b"}``
    (None with the encoder width recorded for non-standard widths).
    """
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        raise WeightsError(f"{source} looks like SAM but has no '{key}' to tell ViT-H/L/B apart")
    width = int(state[key].shape[0])
    variant = SAM_VARIANT_BY_WIDTH.get(width)
    config: dict[str, Any] = {"variant": variant}
    if variant is None:
        log.warning("%s: SAM image encoder width %d is not ViT-H/L/B; variant left unset", source, width)
        config["encoder_embed_dim"] = width
    kept = {k: v for k, v in state.items() if k.startswith(SAM_KEPT_PREFIXES)}
    for prefix in SAM_KEPT_PREFIXES:
        if not _has_prefix(kept, prefix):
            raise WeightsError(f"{source} has no '{prefix}*' tensors; is it a complete SAM checkpoint?")
    return kept, config


def default_name(kind: str, src: Path, config: dict | None = None) -> str:
    """Registry-style name of the bundle imported from ``src`` (matches the 'derived' entries)."""
    if kind == "sam" and config and config.get("variant"):
        return f"sam_{config['variant']}_prompt_decoder"
    if kind in ("sam", "sam2"):
        return f"{src.stem}_prompt_decoder"
    if kind == "lgvit":
        return f"{src.stem}_lgvit_neck"
    return src.stem


def import_checkpoint(
    src_path: str | os.PathLike, dest_path: str | os.PathLike | None = None, name: str | None = None
) -> Path:
    """Detect what ``src_path`` holds and write it as an hrmedseg bundle (atomic).

    Args:
        src_path: a SAM, SAM2/SAM2.1, HRMedSeg-authors' or hrmedseg-bundle file.
        dest_path: where to write; default ``cache_dir() / f"{name}.pt"``.
        name: bundle name (default derived from the source, e.g. ``sam_vit_h_prompt_decoder``).

    Returns:
        The path written.

    Raises:
        WeightsError: the file is unreadable, or holds none of the recognised layouts (the
            message names the file and the keys expected).
    """
    from ..hashing import sha256_file
    from .registry import cache_dir

    src = Path(src_path).expanduser()
    obj = read_checkpoint(src)
    kind = detect_kind(obj)
    if kind is None:
        first = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"{src} is not a checkpoint hrmedseg can import (found {first}); expected {EXPECTED_KEYS_TEXT}")

    def destination(config: dict | None = None) -> Path:
        if dest_path is not None:
            return Path(dest_path).expanduser()
        return cache_dir() / f"{name or default_name(kind, src, config)}.pt"

    if kind == "bundle":
        dest = destination()
        if not isinstance(obj.get("state_dict"), Mapping) or not obj.get("architecture"):
            raise WeightsError(f"{src} is an hrmedseg bundle without 'architecture' or 'state_dict'")
        if dest.resolve() != src.resolve():
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
        log.info("copied %s bundle %s to %s", obj["architecture"], src, dest)
        return dest

    digest = sha256_file(src)
    if kind == "sam":
        state = _tensor_dict(obj)
        assert state is not None
        kept, config = extract_sam_decoder_state(state, str(src))
        dest = destination(config)
        holds = f"SAM {config.get('variant') or 'custom'} prompt encoder + mask decoder (image encoder dropped)"
        save_bundle(
            dest, SAM_PROMPT_DECODER, kept, config=config,
            provenance=_source_provenance(src, digest, holds, SAM_LICENCE),
        )
    elif kind == "sam2":
        try:
            from ..models.sam2 import extract_sam2_decoder_state
        except ImportError as err:
            raise WeightsError(
                f"{src} is a SAM2 checkpoint, but this hrmedseg has no SAM2 support yet "
                f"(hrmedseg.models.sam2.extract_sam2_decoder_state: {err})"
            ) from err
        kept, config = extract_sam2_decoder_state(obj["model"], str(src))
        dest = destination(config)
        holds = f"SAM2 {config.get('sam2_config', '')} prompt encoder + mask decoder (image encoder and memory dropped)".replace("  ", " ")
        save_bundle(
            dest, SAM2_PROMPT_DECODER, kept, config=config,
            provenance=_source_provenance(src, digest, holds, SAM_LICENCE),
        )
    else:  # lgvit
        from ..models.encoder_loading import load_encoder, save_encoder

        del obj  # load_encoder reads the file again; do not hold two copies
        encoder = load_encoder(src)
        dest = destination()
        save_encoder(
            encoder, dest,
            provenance=_source_provenance(
                src, digest,
                "HRMedSeg LGViT + neck image encoder (the authors' pretraining release)",
                "not stated by the authors",
            ),
        )
    log.info("imported %s (%s) as %s", src, kind, dest)
    return dest
