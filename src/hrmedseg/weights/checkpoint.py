"""What a weights file is and what its tensors are: the one reader of checkpoints.

``read_checkpoint(path)`` loads a file once (on the CPU; memory-mapped when it is a zip) and
returns a :class:`Checkpoint`: its kind, its unwrapped tensors and, for our bundles, the
recorded config, preprocessing and provenance. Everything that asks "what is this file" (the
model loader, the importer, the registry, the semantic engine, the CLI) asks it here.

Kinds (one vocabulary, by the keys inside, never by file name):

| kind | file |
| --- | --- |
| "hrmedseg_sam", "hrmedseg_sam2", "hrmedseg", "lgvit_neck", "sam_prompt_decoder", "sam2_prompt_decoder", ... | an hrmedseg bundle of that architecture |
| "sam" | a segment-anything state dict with ``prompt_encoder.*`` and ``mask_decoder.*`` |
| "sam2" | a SAM2 / SAM2.1 state dict (usually ``{"model": {...}}``) with ``sam_mask_decoder.*`` |
| "litemedsam" | LiteMedSAM (``lite_medsam.pth``): a TinyViT ``image_encoder.patch_embed.seq.*`` with SAM's prompt encoder and mask decoder |
| "lgvit_neck" (``is_bundle`` False) | the HRMedSeg authors' LGViT + neck release (``SAM_PFD_10K.pth``): ``image_encoder.layers.*`` and ``neck.*`` |
| "unknown" | anything else (``state`` may be empty) |

This module knows file layouts only; whether tensors fit a model is checked where the model is
built (``hrmedseg.models``), which may import this module but not the other way round.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import WeightsError
from .bundle import check_architecture, is_bundle, load_file

log = logging.getLogger(__name__)

SAM = "sam"
SAM2 = "sam2"
LGVIT_NECK = "lgvit_neck"
LITEMEDSAM = "litemedsam"
UNKNOWN = "unknown"
TINYVIT_PATCH_EMBED = "image_encoder.patch_embed.seq."  # LiteMedSAM's TinyViT stem

SAM_DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")
# Width of SAM's ViT patch embedding, which tells the variant of a full SAM checkpoint
# (segment_anything.build_sam).
SAM_VARIANT_BY_WIDTH = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}
SAM_PATCH_EMBED_KEY = "image_encoder.patch_embed.proj.weight"
# Where trainers put the tensors of a checkpoint that is not a bare state dict.
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


@dataclass(frozen=True)
class Checkpoint:
    """A weights file read once: what it is and its tensors.

    Attributes:
        path: the file.
        kind: see the module docstring (a bundle's architecture, "sam", "sam2", "lgvit_neck",
            "unknown").
        is_bundle: an hrmedseg bundle (``config``/``preprocessing``/``provenance`` come from
            it), as opposed to a file of another project.
        state: {name: tensor} on the CPU (memory-mapped for zip files): the bundle's
            ``state_dict``, or the unwrapped state dict of a foreign file (DataParallel's
            ``module.`` prefix removed); empty for an unknown file without tensors.
        config: the bundle's architecture settings ({} for foreign files).
        preprocessing: the bundle's pixel normalisation ({"pixel_mean": [3], "pixel_std": [3]}),
            {} when not recorded.
        provenance: the bundle's record of where the weights come from ({} for foreign files).
        contents: what the loaded object looked like (its first five keys, or its type), for
            messages about files of an unknown kind.
    """

    path: Path
    kind: str
    is_bundle: bool
    state: dict[str, torch.Tensor] = field(repr=False)
    config: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    contents: str = ""

    @property
    def source(self) -> str:
        return str(self.path)

    def require_bundle(self, architecture: str | tuple[str, ...] | None = None) -> "Checkpoint":
        """This checkpoint, if it is a bundle of ``architecture`` (None: any); else WeightsError naming the file."""
        if not self.is_bundle:
            raise WeightsError(f"{self.path} is not an hrmedseg bundle (no 'format': 'hrmedseg-bundle' entry)")
        check_architecture(self.path, self.kind, architecture)
        return self


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` from every key when all keys have it (e.g. DataParallel's ``module.``)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a raw checkpoint: a bare state dict, or one under 'state_dict'/'model'/'model_state_dict'.

    Raises:
        WeightsError: naming ``source`` when no {name: tensor} mapping is found.
    """
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source} holds no state dict of tensors")
    return strip_prefix(obj, "module.")


def _has_prefix(keys: Any, prefix: str) -> bool:
    return any(str(k).startswith(prefix) for k in keys)


def foreign_kind(state: Mapping[str, torch.Tensor]) -> str:
    """"sam2", "litemedsam", "sam", "lgvit_neck" or "unknown" for an unwrapped state dict of a non-bundle file."""
    if _has_prefix(state, "sam_mask_decoder."):
        return SAM2
    if _has_prefix(state, "prompt_encoder.") and _has_prefix(state, "mask_decoder."):
        # SAM's ViT has image_encoder.patch_embed.proj.*; LiteMedSAM's TinyViT a convolution sequence.
        return LITEMEDSAM if _has_prefix(state, TINYVIT_PATCH_EMBED) else SAM
    if _has_prefix(state, "image_encoder.layers.") and _has_prefix(state, "neck."):
        return LGVIT_NECK
    return UNKNOWN


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load ``path`` once and say what it holds.

    Raises:
        WeightsError: naming the file when it is missing, unreadable, or a bundle without
            'architecture' or 'state_dict'. An unrecognised file is not an error here
            (``kind == "unknown"``); callers say what they expected.
    """
    path = Path(path)
    obj = load_file(path)
    contents = str(list(obj)[:5]) if isinstance(obj, Mapping) else type(obj).__name__
    if is_bundle(obj):
        state, architecture = obj.get("state_dict"), obj.get("architecture")
        if not isinstance(state, Mapping) or not architecture:
            raise WeightsError(f"{path} is an hrmedseg bundle without 'architecture' or 'state_dict'")
        return Checkpoint(
            path, str(architecture), True, dict(state),
            config=dict(obj.get("config") or {}),
            preprocessing=dict(obj.get("preprocessing") or {}),
            provenance=dict(obj.get("provenance") or {}),
            contents=contents,
        )
    try:
        state = unwrap_state_dict(obj, str(path))
    except WeightsError:
        return Checkpoint(path, UNKNOWN, False, {}, contents=contents)
    return Checkpoint(path, foreign_kind(state), False, state, contents=contents)


def sam_variant(state: Mapping[str, torch.Tensor]) -> str | None:
    """'vit_h', 'vit_l' or 'vit_b' for a full SAM state dict; None if its image encoder is absent or unknown."""
    weight = state.get(SAM_PATCH_EMBED_KEY)
    return None if weight is None else SAM_VARIANT_BY_WIDTH.get(int(weight.shape[0]))


def describe_other_decoder(wanted: str, state: Mapping[str, torch.Tensor]) -> str | None:
    """What ``state`` clearly is instead of a ``wanted`` ("sam" or "sam2") checkpoint, for error messages; else None."""
    if wanted != SAM2 and _has_prefix(state, "sam_mask_decoder."):
        return "a SAM2 checkpoint (use build_hrmedseg_sam2 for SAM2 decoders)"
    if wanted != SAM and _has_prefix(state, "mask_decoder.") and _has_prefix(state, "prompt_encoder."):
        return "a SAM (v1) checkpoint (use build_hrmedseg_sam for SAM decoders)"
    if _has_prefix(state, "image_encoder.layers.") and "neck.0.weight" in state:
        return "an LGViT + neck encoder checkpoint (pass it as the encoder, not the decoder)"
    return None


def extract_sam_decoder_state(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ``prompt_encoder.*`` and ``mask_decoder.*`` tensors of a SAM checkpoint.

    Args:
        state: a full SAM state dict (ViT-H/L/B, e.g. ``sam_vit_h_4b8939.pth``), with or without
            DataParallel's ``module.`` prefix or a 'model'/'state_dict' wrapper, or one that
            already holds only the decoder.
        source: the file (or name) it came from, for error messages.

    Returns:
        {name: tensor} of every key under the two prefixes, unchanged (SAM's decoder: about
        4 M parameters, the same shapes in every SAM variant). Whether they fit SAM's modules is
        checked by ``hrmedseg.models.sam.sam_decoder_from_checkpoint``.

    Raises:
        WeightsError: naming ``source`` when it is another kind of checkpoint or holds neither prefix.
    """
    state = unwrap_state_dict(state, source)
    foreign = describe_other_decoder(SAM, state)
    if foreign:
        raise WeightsError(f"{source} is {foreign}; expected a SAM checkpoint such as sam_vit_h_4b8939.pth")
    decoder = {k: v for k, v in state.items() if k.startswith(SAM_DECODER_PREFIXES)}
    if not decoder:
        raise WeightsError(
            f"{source} holds no SAM prompt encoder / mask decoder ('prompt_encoder.*', 'mask_decoder.*'); "
            f"expected a SAM checkpoint such as sam_vit_h_4b8939.pth (first keys: {', '.join(list(state)[:3])})"
        )
    return decoder


__all__ = [
    "Checkpoint",
    "read_checkpoint",
    "unwrap_state_dict",
    "strip_prefix",
    "foreign_kind",
    "describe_other_decoder",
    "sam_variant",
    "extract_sam_decoder_state",
]
