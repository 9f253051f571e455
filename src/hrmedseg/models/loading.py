"""One entry point for every model hrmedseg runs: ``load_model(name_or_path)``.

What a file holds decides what is built:

| file holds | returns |
| --- | --- |
| "hrmedseg_sam" bundle | HRMedSegSAM (``segment_anything`` ``Sam``, for ``SamPredictor``) |
| "hrmedseg_sam2" bundle | HRMedSegSAM2 (``sam2`` ``SAM2Base``, for ``SAM2ImagePredictor``) |
| "hrmedseg" bundle | prompt-free HRMedSeg |
| encoder ("lgvit_neck" bundle or the authors' ``SAM_PFD_10K.pth``) + ``decoder=`` | HRMedSegSAM or HRMedSegSAM2, as the decoder is SAM or SAM2 |

An encoder alone, a decoder alone, or a SAM/SAM2 checkpoint alone is refused with a
``WeightsError`` that says what to add.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..weights.bundle import WeightsError, is_bundle, read_checkpoint
from .encoder_loading import ENCODER_ARCHITECTURE, load_encoder, unwrap_state_dict

_WEIGHTS_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".safetensors"}
_DECODER_HINT = "e.g. load_model('hrmedseg_pfd_10k', decoder='sam_vit_h_prompt_decoder')"


def resolve_spec(spec: str | os.PathLike, weights_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """A weights file for ``spec``: an existing path, else a name of the weights registry.

    Raises:
        WeightsError: naming ``spec`` when it is neither an existing file nor a known name.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    text = str(spec)
    looks_like_path = isinstance(spec, os.PathLike) or os.sep in text or "/" in text or path.suffix.lower() in _WEIGHTS_SUFFIXES
    if looks_like_path:
        raise WeightsError(f"weights file not found: {path}")
    from ..weights.registry import resolve

    return resolve(text, weights_dir=weights_dir, download=download)


def _kind(obj: Any) -> str:
    """What a loaded checkpoint holds: a bundle architecture, or "sam", "sam2", "lgvit_neck", "unknown"."""
    if is_bundle(obj):
        return str(obj["architecture"])
    if isinstance(obj, Mapping):
        model = obj.get("model")
        if isinstance(model, Mapping) and any(str(k).startswith("sam_mask_decoder.") for k in model):
            return "sam2"
        try:
            state = unwrap_state_dict(obj, "")
        except WeightsError:
            return "unknown"
        if any(k.startswith("mask_decoder.") for k in state) and any(k.startswith("prompt_encoder.") for k in state):
            return "sam"
        if any(k.startswith("image_encoder.layers.") for k in state) and any(k.startswith("neck.") for k in state):
            return ENCODER_ARCHITECTURE
    return "unknown"


_SAM_DECODER_KINDS = {"sam", "sam_prompt_decoder", "hrmedseg_sam"}
_SAM2_DECODER_KINDS = {"sam2", "sam2_prompt_decoder", "hrmedseg_sam2"}


def load_model(
    spec: str | os.PathLike,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None,
    download: bool = False,
    sam2_config: str | None = None,
):
    """Build the model a weights file (or registry name) holds, in eval mode on ``device``.

    Args:
        spec: path to a bundle/checkpoint, or a registry name (``hrmedseg weights list``).
        device: where the model goes.
        weights_dir: extra folder searched first for named weights.
        decoder: with an encoder-only ``spec``: the SAM or SAM2 decoder to pair it with (a path
            or registry name: a SAM or SAM2 checkpoint, or a "sam_prompt_decoder" /
            "sam2_prompt_decoder" bundle). Its kind picks HRMedSegSAM or HRMedSegSAM2.
        download: let the registry download named weights that are not on this computer.
        sam2_config: for HRMedSegSAM2 from an encoder + SAM2 decoder, the sam2 config to use
            (default: the decoder's).

    Returns:
        ``segment_anything.modeling.Sam`` (HRMedSegSAM), ``SAM2Base`` (HRMedSegSAM2) or
        ``HRMedSeg`` (prompt-free). Each carries its own pixel normalisation.

    Raises:
        WeightsError: naming the file or name, when it is missing, unreadable, or holds something
            that is not a runnable model on its own (and then what to add).
    """
    path = resolve_spec(spec, weights_dir, download)
    source = str(path) if str(path) == str(spec) else f"{spec} ({path})"
    obj = read_checkpoint(path)
    kind = _kind(obj)

    if kind in ("hrmedseg_sam", "hrmedseg_sam2", "hrmedseg") and decoder is not None:
        raise WeightsError(f"{source} holds a complete '{kind}' model; it takes no separate decoder ({decoder})")
    if kind in ("hrmedseg_sam", "hrmedseg_sam2"):
        if kind == "hrmedseg_sam":
            from .sam import hrmedseg_sam_from_bundle as from_bundle
        else:
            from .sam2 import hrmedseg_sam2_from_bundle as from_bundle
        model = from_bundle(obj, source, device)
        # Where the weights came from travels with the model (the annotator marks untrained ones).
        model.hrmedseg_provenance = dict(obj.get("provenance") or {})
        return model
    if kind == "hrmedseg":
        from .hrmedseg_model import load_hrmedseg

        del obj  # load_hrmedseg reads the file itself
        return load_hrmedseg(path, device)
    if kind == ENCODER_ARCHITECTURE:
        if decoder is None:
            raise WeightsError(
                f"{source} holds only an image encoder (LGViT + neck); box prompting also needs a SAM or SAM2 "
                f"prompt encoder + mask decoder: pass decoder=..., {_DECODER_HINT}"
            )
        del obj
        return _encoder_with_decoder(load_encoder(path), decoder, weights_dir, download, sam2_config, device)
    if kind in ("sam_prompt_decoder", "sam2_prompt_decoder"):
        raise WeightsError(
            f"{source} holds only a {'SAM2' if kind.startswith('sam2') else 'SAM'} prompt encoder + mask decoder; "
            f"load it as the decoder of an HRMedSeg encoder: load_model(<encoder>, decoder='{spec}')"
        )
    if kind in ("sam", "sam2"):
        raise WeightsError(
            f"{source} is a {'SAM2' if kind == 'sam2' else 'SAM'} checkpoint; HRMedSeg uses only its prompt encoder "
            f"and mask decoder, with its own image encoder: load_model(<encoder>, decoder='{spec}')"
        )
    if is_bundle(obj):
        raise WeightsError(f"{source} holds a '{kind}' bundle, which load_model cannot build")
    raise WeightsError(
        f"{source} is not a model hrmedseg knows: expected an hrmedseg bundle (hrmedseg_sam, hrmedseg_sam2, "
        f"hrmedseg, lgvit_neck) or the authors' LGViT checkpoint"
    )


def _encoder_with_decoder(encoder, decoder_spec, weights_dir, download, sam2_config, device):
    decoder_path = resolve_spec(decoder_spec, weights_dir, download)
    source = str(decoder_path) if str(decoder_path) == str(decoder_spec) else f"{decoder_spec} ({decoder_path})"
    obj = read_checkpoint(decoder_path)
    kind = _kind(obj)
    if kind in _SAM_DECODER_KINDS:
        from .sam import assemble_hrmedseg_sam, sam_decoder_from_checkpoint

        state = sam_decoder_from_checkpoint(obj, source)
        del obj  # a full SAM ViT-H file is 2.5 GB; keep only the decoder
        return assemble_hrmedseg_sam(encoder, state, source).to(device)
    if kind in _SAM2_DECODER_KINDS:
        from .sam2 import assemble_hrmedseg_sam2, sam2_decoder_from_checkpoint

        state, config = sam2_decoder_from_checkpoint(obj, source)
        del obj
        return assemble_hrmedseg_sam2(encoder, state, config, source, config=sam2_config).to(device)
    what = "an image encoder" if kind == ENCODER_ARCHITECTURE else f"'{kind}'"
    raise WeightsError(
        f"decoder {source} holds {what}, not a SAM or SAM2 decoder; expected a SAM/SAM2 checkpoint or a "
        f"'sam_prompt_decoder'/'sam2_prompt_decoder' bundle"
    )


__all__ = ["load_model", "resolve_spec"]
