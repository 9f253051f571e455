"""HRMedSeg: the prompt-free model, LGViT + neck encoder followed by the ECM-Decoder.

A normalised (B, 3, H, W) image, H and W multiples of 16, gives (B, num_classes, H, W) logits
(sigmoid per class, as in the authors' Dice + focal training). ``model.preprocessing`` says how
to normalise pixels for its weights. Saved as an hrmedseg bundle with architecture "hrmedseg".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..weights.bundle import WeightsError, save_bundle
from ..weights.checkpoint import Checkpoint, read_checkpoint
from .ecm_decoder import ECMDecoder
from .encoder_loading import load_encoder
from .info import LoadedModel, ModelMetadata
from .neck import EncoderConfig, HRMedSegEncoder
from .preprocessing import Preprocessing
from .state_dict import load_matching

HRMEDSEG_ARCHITECTURE = "hrmedseg"
# Decoder settings a bundle may record; missing ones take ECMDecoder's defaults (the paper's).
_DECODER_KEYS = ("depth", "num_heads", "mlp_dim", "attention_downsample_rate")


class HRMedSeg(nn.Module):
    """LGViT + neck + ECM-Decoder.

    Args:
        num_classes: C2, output channels (one learned query each).
        encoder: an LGViT + neck to use (e.g. a distilled one); a new random one by default.
        pool_sizes: kernels of the decoder's multiscale pooling; ``()`` turns it off.
        class_names: optional names of the output channels, kept in saved bundles.
        decoder_kwargs: further ``ECMDecoder`` arguments (depth, num_heads, mlp_dim, ...).

    ``forward``: normalised (B, 3, H, W) -> (B, C2, H, W) logits.
    """

    def __init__(
        self,
        num_classes: int = 1,
        encoder: HRMedSegEncoder | None = None,
        pool_sizes: Sequence[int] = (5, 9, 13),
        class_names: Sequence[str] | None = None,
        **decoder_kwargs,
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        self.encoder = encoder if encoder is not None else HRMedSegEncoder()
        self.decoder = ECMDecoder(
            num_classes, transformer_dim=self.encoder.config.out_chans, pool_sizes=pool_sizes, **decoder_kwargs
        )
        self.class_names = tuple(class_names) if class_names is not None else None

    @property
    def num_classes(self) -> int:
        return self.decoder.num_classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.encoder.preprocessing

    @property
    def img_size(self) -> int:
        return self.encoder.img_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass (encoder attention blocks, decoder blocks)."""
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: normalised (B, 3, H, W) -> logits (B, C2, H, W)."""
        return self.decoder(self.encoder(x), output_size=tuple(x.shape[-2:]))

    def config_dict(self) -> dict:
        """What ``load_hrmedseg`` needs to rebuild this model."""
        decoder = self.decoder.config_dict()
        return {
            "encoder": self.encoder.config.to_dict(),
            "num_classes": self.num_classes,
            "pool_sizes": list(self.decoder.pool_sizes),
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "decoder": {k: decoder[k] for k in _DECODER_KEYS},
        }


def build_hrmedseg(
    num_classes: int = 1,
    encoder_config: EncoderConfig | None = None,
    pool_sizes: Sequence[int] = (5, 9, 13),
    encoder_weights: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
) -> HRMedSeg:
    """A new HRMedSeg in training mode; random weights, or a pretrained encoder to fine-tune.

    Args:
        num_classes: output channels.
        encoder_config: encoder architecture (paper default: C = 96, L = 10). With
            ``encoder_weights`` it is read from the file; giving a different one is an error.
        pool_sizes: multiscale pooling kernels of the decoder.
        encoder_weights: an LGViT + neck file (authors' checkpoint or our bundle), loaded with
            ``load_encoder``; its pixel normalisation becomes the model's.
        class_names: optional names of the output channels.
    """
    if encoder_weights is None:
        encoder = HRMedSegEncoder(encoder_config)
    else:
        encoder = load_encoder(encoder_weights)
        if encoder_config is not None and encoder_config != encoder.config:
            raise WeightsError(
                f"{encoder_weights} holds an encoder with {encoder.config}, not the requested {encoder_config}"
            )
    return HRMedSeg(num_classes, encoder, pool_sizes, class_names).train()


def save_hrmedseg(
    model: HRMedSeg,
    path: str | os.PathLike,
    provenance: dict | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Save ``model`` as an hrmedseg bundle (atomic). ``class_names`` overrides the model's."""
    config = model.config_dict()
    if class_names is not None:
        if len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} class names given for a {model.num_classes}-class model")
        config["class_names"] = list(class_names)
    return save_bundle(
        path,
        HRMEDSEG_ARCHITECTURE,
        model.state_dict(),
        config=config,
        preprocessing=model.preprocessing.to_dict(),
        provenance=provenance,
    )


def load_hrmedseg(path: str | os.PathLike, device: str | torch.device = "cpu") -> HRMedSeg:
    """Rebuild an HRMedSeg from a bundle written by ``save_hrmedseg``, in eval mode on ``device``.

    Raises:
        WeightsError: naming ``path`` when it is missing, unreadable, not a bundle, a bundle of
            another architecture (e.g. an encoder alone), or tensors that do not fit its config.
    """
    return hrmedseg_from_checkpoint(read_checkpoint(path), device).module


def hrmedseg_from_config(config: dict, preprocessing: dict | None = None) -> HRMedSeg:
    """A new HRMedSeg (random weights) as ``HRMedSeg.config_dict()`` and ``Preprocessing.to_dict()`` describe it.

    JSON in, model out: what a bioimage.io package's ``pytorch_state_dict`` architecture calls.
    Raises KeyError / TypeError / ValueError for an incomplete or malformed config.
    """
    encoder = HRMedSegEncoder(EncoderConfig.from_dict(config["encoder"]), Preprocessing.recorded(preprocessing or {}))
    decoder_kwargs = {k: v for k, v in (config.get("decoder") or {}).items() if k in _DECODER_KEYS}
    return HRMedSeg(int(config["num_classes"]), encoder, tuple(config.get("pool_sizes", (5, 9, 13))),
                    config.get("class_names"), **decoder_kwargs)


def hrmedseg_from_checkpoint(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> LoadedModel:
    """:func:`load_hrmedseg` for a file already read: ``LoadedModel(HRMedSeg, metadata)``.

    ``metadata.provenance`` holds the training record (its ``input_mode``/``img_size``/``scale``
    give the engine's input geometry); ``metadata.input_size`` is the encoder's ``img_size``.
    """
    path = checkpoint.source
    config = checkpoint.require_bundle(HRMEDSEG_ARCHITECTURE).config
    try:
        model = hrmedseg_from_config(config, checkpoint.preprocessing)
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{path}: its hrmedseg config is incomplete or malformed ({err!r})") from err
    load_matching(model, checkpoint.state, path)
    metadata = ModelMetadata(
        kind=HRMEDSEG_ARCHITECTURE, source=path, provenance=checkpoint.provenance, input_size=int(model.img_size)
    )
    return LoadedModel(model.eval().to(device), metadata)


__all__ = ["HRMedSeg", "build_hrmedseg", "save_hrmedseg", "load_hrmedseg", "hrmedseg_from_checkpoint", "hrmedseg_from_config"]
