"""One entry point for every model hrmedseg runs: ``load_model(name_or_path)``.

What a file holds decides what is built:

| file holds | returns |
| --- | --- |
| "hrmedseg_sam" bundle | HRMedSegSAM (``segment_anything`` ``Sam``, for ``SamPredictor``) |
| "hrmedseg_sam2" bundle | HRMedSegSAM2 (``sam2`` ``SAM2Base``, for ``SAM2ImagePredictor``) |
| "hrmedseg" bundle | prompt-free HRMedSeg |
| encoder ("lgvit_neck" bundle or the authors' ``SAM_PFD_10K.pth``) + ``decoder=`` | HRMedSegSAM or HRMedSegSAM2, as the decoder is SAM or SAM2 |

An encoder alone, a decoder alone, or a SAM/SAM2 checkpoint alone is refused with a
``WeightsError`` that says what to add. Each file is read once
(:func:`hrmedseg.weights.checkpoint.read_checkpoint`); :func:`load_model_with_metadata` also
returns where the weights come from and how the model is fed (:class:`~hrmedseg.models.info.ModelMetadata`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import torch
from torch import nn

from ..weights.bundle import WeightsError
from ..weights.checkpoint import LITEMEDSAM, SAM, SAM2, read_checkpoint
from .encoder_loading import ENCODER_ARCHITECTURE, encoder_from_checkpoint
from .info import LoadedModel, ModelMetadata

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
    from .importing import resolve_weights as resolve

    return resolve(text, weights_dir=weights_dir, download=download)


# Files whose prompt encoder + mask decoder can serve an LGViT encoder (LiteMedSAM's are SAM's modules).
_SAM_DECODER_KINDS = {SAM, LITEMEDSAM, "sam_prompt_decoder", "hrmedseg_sam"}
_SAM2_DECODER_KINDS = {SAM2, "sam2_prompt_decoder", "hrmedseg_sam2"}


def load_model(
    spec: str | os.PathLike,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None,
    download: bool = False,
    sam2_config: str | None = None,
) -> nn.Module:
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
        ``HRMedSeg`` (prompt-free). Each carries its own pixel normalisation; its provenance,
        box prior and sam2 settings come with :func:`load_model_with_metadata`.

    Raises:
        WeightsError: naming the file or name, when it is missing, unreadable, or holds something
            that is not a runnable model on its own (and then what to add).
    """
    return load_model_with_metadata(spec, device, weights_dir, decoder, download, sam2_config).module


def load_model_with_metadata(  # the arguments of load_model, in its order
    spec: str | os.PathLike, device: str | torch.device = "cpu", weights_dir: str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None, download: bool = False, sam2_config: str | None = None,
) -> LoadedModel:
    """:func:`load_model` (same arguments and errors) returning ``LoadedModel(module, metadata)``.

    ``metadata`` (:class:`~hrmedseg.models.info.ModelMetadata`): kind ("hrmedseg_sam",
    "hrmedseg_sam2", "hrmedseg"), source, the bundle's provenance ({} for a model assembled
    from an encoder and a decoder), input size, box prior and, for SAM2, its sam2 settings.
    """
    path = resolve_spec(spec, weights_dir, download)
    source = str(path) if str(path) == str(spec) else f"{spec} ({path})"
    checkpoint = read_checkpoint(path)
    kind = checkpoint.kind

    if kind in ("hrmedseg_sam", "hrmedseg_sam2", "hrmedseg") and decoder is not None:
        raise WeightsError(f"{source} holds a complete '{kind}' model; it takes no separate decoder ({decoder})")
    if kind == "hrmedseg_sam":
        from .sam import hrmedseg_sam_from_checkpoint

        return hrmedseg_sam_from_checkpoint(checkpoint, device)
    if kind == "hrmedseg_sam2":
        from .sam2 import hrmedseg_sam2_from_checkpoint

        return hrmedseg_sam2_from_checkpoint(checkpoint, device)
    if kind == "hrmedseg":
        from .hrmedseg_model import hrmedseg_from_checkpoint

        return hrmedseg_from_checkpoint(checkpoint, device)
    if kind == LITEMEDSAM and decoder is None:
        from .litemedsam import litemedsam_from_checkpoint

        return litemedsam_from_checkpoint(checkpoint, device)
    if kind == ENCODER_ARCHITECTURE:
        if decoder is None:
            raise WeightsError(
                f"{source} holds only an image encoder (LGViT + neck); box prompting also needs a SAM or SAM2 "
                f"prompt encoder + mask decoder: pass decoder=..., {_DECODER_HINT}"
            )
        encoder = encoder_from_checkpoint(checkpoint)
        del checkpoint  # its tensors now live in the encoder
        return _encoder_with_decoder(encoder, source, decoder, weights_dir, download, sam2_config, device)
    if kind in ("sam_prompt_decoder", "sam2_prompt_decoder"):
        raise WeightsError(
            f"{source} holds only a {'SAM2' if kind.startswith('sam2') else 'SAM'} prompt encoder + mask decoder; "
            f"load it as the decoder of an HRMedSeg encoder: load_model(<encoder>, decoder='{spec}')"
        )
    if kind in (SAM, SAM2):
        raise WeightsError(
            f"{source} is a {'SAM2' if kind == SAM2 else 'SAM'} checkpoint; HRMedSeg uses only its prompt encoder "
            f"and mask decoder, with its own image encoder: load_model(<encoder>, decoder='{spec}')"
        )
    if checkpoint.is_bundle:
        raise WeightsError(f"{source} holds a '{kind}' bundle, which load_model cannot build")
    raise WeightsError(
        f"{source} is not a model hrmedseg knows: expected an hrmedseg bundle (hrmedseg_sam, hrmedseg_sam2, "
        f"hrmedseg, lgvit_neck) or the authors' LGViT checkpoint"
    )


def _encoder_with_decoder(
    encoder, encoder_source: str, decoder_spec, weights_dir, download, sam2_config, device
) -> LoadedModel:
    decoder_path = resolve_spec(decoder_spec, weights_dir, download)
    source = str(decoder_path) if str(decoder_path) == str(decoder_spec) else f"{decoder_spec} ({decoder_path})"
    checkpoint = read_checkpoint(decoder_path)
    kind = checkpoint.kind
    if kind in _SAM_DECODER_KINDS:
        from .sam import assemble_hrmedseg_sam, sam_decoder_from_checkpoint

        state = sam_decoder_from_checkpoint(checkpoint, source)
        del checkpoint  # a full SAM ViT-H file is 2.5 GB; keep only the decoder
        metadata = ModelMetadata(kind="hrmedseg_sam", source=f"{encoder_source} + {source}")
        return LoadedModel(assemble_hrmedseg_sam(encoder, state, source).to(device), metadata)
    if kind in _SAM2_DECODER_KINDS:
        from .sam2 import assemble_hrmedseg_sam2, sam2_decoder_from_checkpoint

        state, config = sam2_decoder_from_checkpoint(checkpoint, source)
        del checkpoint
        module, metadata = assemble_hrmedseg_sam2(encoder, state, config, source, config=sam2_config)
        metadata = dataclasses.replace(metadata, source=f"{encoder_source} + {source}")
        return LoadedModel(module.to(device), metadata)
    what = "an image encoder" if kind == ENCODER_ARCHITECTURE else f"'{kind}'"
    raise WeightsError(
        f"decoder {source} holds {what}, not a SAM or SAM2 decoder; expected a SAM/SAM2 checkpoint or a "
        f"'sam_prompt_decoder'/'sam2_prompt_decoder' bundle"
    )


__all__ = ["load_model", "load_model_with_metadata", "resolve_spec"]
