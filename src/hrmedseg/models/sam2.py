"""HRMedSegSAM2: sam2's ``SAM2Base`` with the LGViT + neck encoder in place of Hiera + FPN.

SAM2's mask decoder reads three feature levels (strides 4, 8 and 16; 256 x 256, 128 x 128 and
64 x 64 for a 1024 x 1024 input, 256 channels each) and SAM2Base wants positional encodings for
each. LGViT has a single 1/16 map, so ``Sam2Neck`` derives the two finer levels from it by
transposed-convolution upsampling, and uses the HRMedSeg (SAM-compatible) neck for the 1/16
level. Everything else (prompt encoder, mask decoder, memory modules) is sam2's own, built from
the sam2 package's shipped config, so ``sam2.sam2_image_predictor.SAM2ImagePredictor(model)``
works unchanged.

Normalisation: SAM2ImagePredictor always normalises with ImageNet statistics (in 0..1 units;
the same numbers as SAM's mean/std in 0..255). ``HRMedSegSam2ImageEncoder`` undoes that and
applies its encoder's own normalisation (e.g. the authors' std = mean quirk) as one per-channel
affine map on its input, so the predictor and its transforms stay untouched.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..weights.bundle import WeightsError, save_bundle
from ..weights.checkpoint import SAM2, Checkpoint, describe_other_decoder, read_checkpoint, unwrap_state_dict
from .encoder_loading import resolve_encoder
from .info import LoadedModel, ModelMetadata, Sam2Settings
from .layers import LayerNorm2d
from .neck import EncoderConfig, HRMedSegEncoder, SamNeck
from .preprocessing import Preprocessing
from .state_dict import compare_state, describe_mismatch

SAM2_DECODER_ARCHITECTURE = "sam2_prompt_decoder"
HRMEDSEG_SAM2_ARCHITECTURE = "hrmedseg_sam2"
DEFAULT_SAM2_CONFIG = "sam2.1_hiera_t"

# What SAM2ImagePredictor applies before the model sees the image (sam2.utils.transforms), in 0..255.
SAM2_PREDICTOR_PREPROCESSING = Preprocessing(
    tuple(255.0 * m for m in (0.485, 0.456, 0.406)), tuple(255.0 * s for s in (0.229, 0.224, 0.225))
)

# Tensors of SAM2Base outside the image encoder that the single-image path uses (see
# extract_sam2_decoder_state); the rest serve video tracking only.
IMAGE_PATH_PREFIXES = ("sam_prompt_encoder.", "sam_mask_decoder.")
IMAGE_PATH_KEYS = ("no_mem_embed", "no_mem_pos_enc")

# Hiera trunk (embed width, number of blocks) -> size letter of the sam2 configs.
_HIERA_SIZES = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}


# --------------------------------------------------------------------------------------------
# Neck and image encoder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sam2NeckConfig:
    """Widths of the neck that turns the LGViT 1/16 map into SAM2's three levels."""

    d_model: int = 256  # channels of every level (SAM2's mask decoder expects 256)
    stride8_dim: int = 64  # hidden width after the first x2 transposed conv
    stride4_dim: int = 32  # hidden width after the second x2 transposed conv

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "Sam2NeckConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Upsample2x(nn.Sequential):
    """(B, in, h, w) -> (B, out, 2h, 2w): 2x2 stride-2 transposed conv, LayerNorm2d, GELU (as in SAM's mask upscaling)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__(nn.ConvTranspose2d(in_chans, out_chans, 2, stride=2), LayerNorm2d(out_chans), nn.GELU())


class Sam2Neck(nn.Module):
    """LGViT 1/16 map -> SAM2's feature pyramid with sine positional encodings.

    Level 2 (1/16) is the SAM-compatible HRMedSeg neck (pretrained with the encoder). Levels 1
    (1/8) and 0 (1/4) come from the LGViT map by one and two x2 upsamplings, each projected to
    ``d_model`` by a 1x1 conv. Those projections start at zero: until the branches are trained,
    the fine levels carry no signal and SAM2's decoder leans on the 1/16 embedding alone, instead
    of being fed random features.

    Args:
        in_chans: LGViT width C.
        config: widths (``Sam2NeckConfig``).
        level16: the SamNeck to use for the 1/16 level (an encoder's pretrained ``neck``), or
            None for a new one.

    Forward: (B, C, h, w) -> (features, positions), each a list of three (B, d_model, ., .)
    maps, finest first: (4h, 4w), (2h, 2w), (h, w).
    """

    def __init__(self, in_chans: int = 96, config: Sam2NeckConfig | None = None, level16: SamNeck | None = None):
        super().__init__()
        from sam2.modeling.position_encoding import PositionEmbeddingSine

        self.config = config or Sam2NeckConfig()
        c = self.config
        self.d_model = c.d_model  # SAM2Base reads image_encoder.neck.d_model
        self.level16 = level16 if level16 is not None else SamNeck(in_chans, c.d_model)
        self.up8 = Upsample2x(in_chans, c.stride8_dim)
        self.proj8 = nn.Conv2d(c.stride8_dim, c.d_model, 1)
        self.up4 = Upsample2x(c.stride8_dim, c.stride4_dim)
        self.proj4 = nn.Conv2d(c.stride4_dim, c.d_model, 1)
        for proj in (self.proj8, self.proj4):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        # The same sine encoding, with the same arguments, as sam2's shipped FpnNeck configs.
        self.position_encoding = PositionEmbeddingSine(num_pos_feats=c.d_model, normalize=True, temperature=10000)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        level16 = self.level16(x)
        hidden8 = self.up8(x)
        level8 = self.proj8(hidden8)
        level4 = self.proj4(self.up4(hidden8))
        features = [level4, level8, level16]
        positions = [self.position_encoding(f).to(f.dtype) for f in features]
        return features, positions


class HRMedSegSam2ImageEncoder(nn.Module):
    """LGViT + ``Sam2Neck``, with the interface of sam2's ``ImageEncoder``.

    Input: (B, 3, H, W) normalised as SAM2ImagePredictor does (``input_preprocessing``), H and W
    multiples of 16. Output: {"vision_features": (B, 256, H/16, W/16), "vision_pos_enc": [3 maps],
    "backbone_fpn": [(B, 256, H/4, W/4), (B, 256, H/8, W/8), (B, 256, H/16, W/16)]}.

    The encoder's own normalisation (``preprocessing``) is applied by re-normalising the input,
    so weights trained with another one (the authors' checkpoint divides by the mean) are fed
    what they expect.
    """

    def __init__(
        self,
        encoder: HRMedSegEncoder,
        neck_config: Sam2NeckConfig | None = None,
        input_preprocessing: Preprocessing = SAM2_PREDICTOR_PREPROCESSING,
    ) -> None:
        super().__init__()
        self.config = encoder.config
        self.preprocessing = encoder.preprocessing
        self.input_preprocessing = input_preprocessing
        self.img_size = encoder.img_size
        self.trunk = encoder.image_encoder
        self.neck = Sam2Neck(encoder.config.embed_dim, neck_config, level16=encoder.neck)
        # x_ours = (pixels - mean) / std with pixels = x_in * std_in + mean_in.
        mean_in, std_in = (torch.tensor(v).view(1, 3, 1, 1) for v in (input_preprocessing.pixel_mean, input_preprocessing.pixel_std))
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (self.preprocessing.pixel_mean, self.preprocessing.pixel_std))
        self.renormalise = not (torch.allclose(mean_in, mean) and torch.allclose(std_in, std))
        self.register_buffer("input_scale", std_in / std, persistent=False)
        self.register_buffer("input_shift", (mean_in - mean) / std, persistent=False)

    def hrmedseg_encoder(self) -> HRMedSegEncoder:
        """The LGViT + SAM neck inside, as an ``HRMedSegEncoder`` sharing these modules."""
        encoder = HRMedSegEncoder(self.config, self.preprocessing)
        encoder.image_encoder = self.trunk
        encoder.neck = self.neck.level16
        return encoder

    def forward(self, x: torch.Tensor) -> dict:
        if self.renormalise:
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        features, positions = self.neck(self.trunk(x))
        return {"vision_features": features[-1], "vision_pos_enc": positions, "backbone_fpn": features}


# --------------------------------------------------------------------------------------------
# SAM2Base from the sam2 package's configs
# --------------------------------------------------------------------------------------------


def _config_path(config: str):
    name = config.removesuffix(".yaml").rsplit("/", 1)[-1]
    folder = "sam2.1" if name.startswith("sam2.1") else "sam2"
    path = importlib.resources.files("sam2") / "configs" / folder / f"{name}.yaml"
    if not path.is_file():
        raise WeightsError(
            f"unknown SAM2 config '{config}': expected one of sam2.1_hiera_t/s/b+/l or sam2_hiera_t/s/b+/l"
        )
    return name, path


def _sam2_model_kwargs(config: str) -> tuple[str, dict]:
    """SAM2Base's arguments from sam2's shipped yaml, without its image encoder."""
    from omegaconf import OmegaConf

    name, path = _config_path(config)
    with path.open() as f:
        cfg = OmegaConf.load(f)
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs.pop("image_encoder")
    # The same post-processing that sam2.build_sam.build_sam2 switches on by default.
    extra = dict(kwargs.get("sam_mask_decoder_extra_args") or {})
    extra.update(
        dynamic_multimask_via_stability=True,
        dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98,
    )
    kwargs["sam_mask_decoder_extra_args"] = extra
    return name, kwargs


def build_sam2_base(
    image_encoder: nn.Module, config: str = DEFAULT_SAM2_CONFIG, model_class: type | None = None, **overrides
) -> nn.Module:
    """sam2's model (the config's ``_target_``, SAM2Base) with ``image_encoder`` in place of Hiera + FPN.

    ``model_class``: another SAM2Base subclass to build (e.g. sam2's ``SAM2VideoPredictor``);
    ``overrides``: constructor arguments that replace the config's (e.g. ``image_size``).
    """
    from hydra.utils import get_class, instantiate

    _, kwargs = _sam2_model_kwargs(config)
    target = kwargs.pop("_target_")
    model_class = model_class or get_class(target)
    memory_specs = {name: kwargs.pop(name) for name in ("memory_attention", "memory_encoder")}
    kwargs.update(overrides)  # given memory modules are used as they are
    for name, spec in memory_specs.items():
        if name not in kwargs:
            kwargs[name] = instantiate(spec, _recursive_=True)
    return model_class(image_encoder=image_encoder, **kwargs)


class _ShapeOnlyImageEncoder(nn.Module):
    """Enough of an image encoder for SAM2Base.__init__, to learn the shapes of its other tensors."""

    def __init__(self, d_model: int = 256) -> None:
        super().__init__()
        self.neck = nn.Module()
        self.neck.d_model = d_model


def _reference_decoder_state(config: str) -> dict[str, torch.Tensor]:
    model = build_sam2_base(_ShapeOnlyImageEncoder(), config)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}


# --------------------------------------------------------------------------------------------
# Decoder weights
# --------------------------------------------------------------------------------------------


def _is_image_path_key(key: str) -> bool:
    return key.startswith(IMAGE_PATH_PREFIXES) or key in IMAGE_PATH_KEYS


def sam2_config_of(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The sam2 config a SAM2/SAM2.1 state dict fits, from its keys and shapes.

    SAM2.1 files have ``no_obj_embed_spatial`` and ``obj_ptr_tpos_proj.weight`` (SAM2.1 configs
    switch those on); the Hiera size comes from the trunk's width and block count. Without the
    trunk (an extracted decoder) the size is reported as "t": the parts outside the image encoder
    are the same in every size.
    """
    version = "sam2.1" if ("no_obj_embed_spatial" in state_dict or "obj_ptr_tpos_proj.weight" in state_dict) else "sam2"
    size = "t"
    patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is not None:
        blocks = {int(m[1]) for k in state_dict if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
        size = _HIERA_SIZES.get((int(patch.shape[0]), len(blocks)), "t")
    return f"{version}_hiera_{size}"


def extract_sam2_decoder_state(
    state_dict: Mapping[str, torch.Tensor], source: str, include_memory: bool = False, config: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Keep the tensors of a SAM2/SAM2.1 checkpoint that HRMedSegSAM2 takes from it.

    Kept (the single-image path of SAM2ImagePredictor):

    - ``sam_prompt_encoder.*``: box/point/mask prompt embeddings;
    - ``sam_mask_decoder.*``: the mask decoder, including ``conv_s0``/``conv_s1`` that
      ``SAM2Base.forward_image`` applies to the 1/4 and 1/8 levels;
    - ``no_mem_embed``: added by the image predictor to the 1/16 features (the model was trained
      with it on frames without memory); ``no_mem_pos_enc``: its positional counterpart, kept so
      the pair stays together (256 numbers).

    Left out unless ``include_memory``: ``memory_attention.*``, ``memory_encoder.*``,
    ``maskmem_tpos_enc``, ``obj_ptr_proj.*``, ``obj_ptr_tpos_proj.*``, ``no_obj_ptr``,
    ``no_obj_embed_spatial``, ``mask_downsample.*``; only video tracking uses them (about 7.5 M
    of the 12 M parameters outside the image encoder). ``image_encoder.*`` (Hiera + FPN) is
    always dropped: our encoder replaces it.

    Args:
        state_dict: ``torch.load`` of a SAM2 file (``{"model": state_dict}``) or the state dict.
        source: file or name, for error messages.
        include_memory: also keep the video-tracking tensors.
        config: the sam2 config to check against, when known (an extracted decoder without its
            memory tensors cannot tell SAM2 from SAM2.1); None decides it from the tensors.

    Returns:
        (tensors, config): config is ``{"sam2_config": "sam2.1_hiera_t" | ..., "memory": bool}``,
        the sam2 config the checkpoint was made with (decided by ``sam2_config_of``) and whether
        the memory tensors are included.

    Raises:
        WeightsError: naming ``source`` for a SAM (v1) or LGViT file, or missing/misshapen tensors.
    """
    state_dict = unwrap_state_dict(state_dict, source)
    foreign = describe_other_decoder(SAM2, state_dict)
    if foreign:
        raise WeightsError(f"{source} is {foreign}; expected a SAM2 checkpoint such as sam2.1_hiera_large.pt")
    if not any(k.startswith("sam_mask_decoder.") for k in state_dict):
        raise WeightsError(
            f"{source} holds no SAM2 mask decoder ('sam_mask_decoder.*'); expected a SAM2 checkpoint such as "
            f"sam2.1_hiera_large.pt (first keys: {', '.join(list(state_dict)[:3])})"
        )
    config_name = _config_path(config)[0] if config else sam2_config_of(state_dict)
    reference = _reference_decoder_state(config_name)
    wanted = [k for k in reference if include_memory or _is_image_path_key(k)]
    missing = [k for k in wanted if k not in state_dict]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs {config_name} {tuple(reference[k].shape)}"
        for k in wanted
        if k in state_dict and state_dict[k].shape != reference[k].shape
    ]
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if mismatched:
            detail.append(f"{len(mismatched)} of another shape (e.g. {'; '.join(mismatched[:3])})")
        raise WeightsError(f"{source} does not fit sam2 config {config_name}: " + ", ".join(detail))
    return {k: state_dict[k] for k in wanted}, {"sam2_config": config_name, "memory": include_memory}


def sam2_decoder_from_checkpoint(checkpoint: Checkpoint, source: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Decoder tensors and config of a read SAM2 checkpoint (memory included) or bundle.

    Accepts a SAM2/SAM2.1 file, a "sam2_prompt_decoder" bundle or an "hrmedseg_sam2" bundle
    (whose heads are reused); anything else raises a WeightsError naming ``source`` (default: the file).
    """
    source = source or checkpoint.source
    if not checkpoint.is_bundle:
        return extract_sam2_decoder_state(checkpoint.state, source, include_memory=True)
    if checkpoint.kind == SAM2_DECODER_ARCHITECTURE:
        has_memory = any(not _is_image_path_key(k) for k in checkpoint.state)
        # The bundle's own record of its config wins: an extracted decoder has no Hiera to tell the size.
        return extract_sam2_decoder_state(
            checkpoint.state, source, include_memory=has_memory, config=checkpoint.config.get("sam2_config")
        )
    if checkpoint.kind == HRMEDSEG_SAM2_ARCHITECTURE:
        config = checkpoint.config
        state = {k: v for k, v in checkpoint.state.items() if not k.startswith("image_encoder.")}
        return state, {"sam2_config": config.get("sam2_config", DEFAULT_SAM2_CONFIG), "memory": config.get("memory", False)}
    raise WeightsError(
        f"{source} holds a '{checkpoint.kind}' bundle; expected a SAM2 decoder "
        f"('{SAM2_DECODER_ARCHITECTURE}' bundle or a SAM2 checkpoint such as sam2.1_hiera_large.pt)"
    )


def read_sam2_decoder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Decoder tensors and config from a SAM2 checkpoint (memory included) or a "sam2_prompt_decoder" bundle."""
    return sam2_decoder_from_checkpoint(read_checkpoint(path))


def _load_decoder_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load decoder tensors into SAM2Base: all image-path tensors required, memory tensors optional."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}
    missing, unexpected, mismatched = compare_state(own, state, [k for k in own if _is_image_path_key(k)])
    if unexpected or missing or mismatched:
        raise WeightsError(f"{source} does not fit the SAM2 decoder: " + describe_mismatch(missing, unexpected, mismatched))
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------


def build_hrmedseg_sam2(
    encoder: HRMedSegEncoder | str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None,
    config: str | None = None,
    device: str | torch.device = "cpu",
    neck_config: Sam2NeckConfig | None = None,
):
    """HRMedSegSAM2: SAM2Base with LGViT + ``Sam2Neck`` as its image encoder, in eval mode.

    Args:
        encoder: an ``HRMedSegEncoder``, a path to its weights, or None (random, paper size).
        decoder: a SAM2/SAM2.1 checkpoint (``{"model": state_dict}``; all its tensors outside the
            image encoder are loaded, memory modules included), a "sam2_prompt_decoder" bundle,
            or None (random).
        config: sam2 config name ("sam2.1_hiera_t", "sam2_hiera_l", ...); None takes the one
            the decoder was made with, else "sam2.1_hiera_t". The image encoder part of the config
            is not used; it decides the SAM2 vs SAM2.1 heads.
        device: where the model goes.
        neck_config: widths of ``Sam2Neck``.

    Returns:
        ``SAM2Base``; ``SAM2ImagePredictor(model)`` works unchanged. Its sam2 config, neck widths
        and whether video memory weights were loaded: :func:`build_hrmedseg_sam2_with_metadata`.
    """
    return build_hrmedseg_sam2_with_metadata(encoder, decoder, config, device, neck_config).module


def build_hrmedseg_sam2_with_metadata(  # the arguments of build_hrmedseg_sam2, in its order
    encoder: HRMedSegEncoder | str | os.PathLike | None = None, decoder: str | os.PathLike | None = None,
    config: str | None = None, device: str | torch.device = "cpu", neck_config: Sam2NeckConfig | None = None,
) -> LoadedModel:
    """:func:`build_hrmedseg_sam2` with its :class:`ModelMetadata` (``metadata.sam2``: config, memory, neck)."""
    state, found = (None, {}) if decoder is None else read_sam2_decoder(decoder)
    module, metadata = assemble_hrmedseg_sam2(
        resolve_encoder(encoder), state, found, str(decoder), config=config, neck_config=neck_config
    )
    return LoadedModel(module.to(device), metadata)


def assemble_hrmedseg_sam2(
    encoder: HRMedSegEncoder,
    decoder_state: Mapping[str, torch.Tensor] | None,
    decoder_config: dict | None = None,
    source: str = "",
    config: str | None = None,
    neck_config: Sam2NeckConfig | None = None,
) -> LoadedModel:
    """SAM2Base from an encoder and extracted decoder tensors (None: random), in eval mode on the CPU.

    ``decoder_config`` is what ``sam2_decoder_from_checkpoint`` returned with the tensors.
    Returns ``LoadedModel(SAM2Base, metadata)`` (``metadata.source`` is "": nothing was loaded as a whole).
    """
    decoder_config = decoder_config or {}
    config_name = config or decoder_config.get("sam2_config", DEFAULT_SAM2_CONFIG)
    image_encoder = HRMedSegSam2ImageEncoder(encoder, neck_config)
    model = build_sam2_base(image_encoder, config_name)
    if decoder_state is not None:
        _load_decoder_state(model, decoder_state, source)
    settings = Sam2Settings(
        _config_path(config_name)[0], bool(decoder_config.get("memory", False)), image_encoder.neck.config.to_dict()
    )
    return LoadedModel(model.eval(), _sam2_metadata(model, settings))


def _sam2_metadata(model: nn.Module, settings: Sam2Settings, source: str = "", provenance: dict | None = None) -> ModelMetadata:
    return ModelMetadata(
        kind=HRMEDSEG_SAM2_ARCHITECTURE, source=source, provenance=provenance or {},
        input_size=int(model.image_size), sam2=settings,
    )


def save_hrmedseg_sam2(
    model, path: str | os.PathLike, provenance: dict | None = None, settings: Sam2Settings | None = None
) -> Path:
    """Save a complete HRMedSegSAM2 (encoder, neck, SAM2 heads) as one "hrmedseg_sam2" bundle.

    ``settings``: the model's ``metadata.sam2`` (its sam2 config and memory flag); None records
    the default config ("sam2.1_hiera_t") without memory.
    """
    image_encoder = model.image_encoder
    if not isinstance(image_encoder, HRMedSegSam2ImageEncoder):
        raise TypeError(f"not an HRMedSegSAM2: its image encoder is a {type(image_encoder).__name__}")
    return save_bundle(
        path,
        HRMEDSEG_SAM2_ARCHITECTURE,
        model.state_dict(),
        config={
            "encoder": image_encoder.config.to_dict(),
            "neck": image_encoder.neck.config.to_dict(),
            "sam2_config": settings.sam2_config if settings else DEFAULT_SAM2_CONFIG,
            "memory": bool(settings.memory) if settings else False,
        },
        preprocessing=image_encoder.preprocessing.to_dict(),
        provenance=provenance,
    )


def hrmedseg_sam2_from_checkpoint(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild an HRMedSegSAM2 from a read "hrmedseg_sam2" bundle: ``LoadedModel(SAM2Base, metadata)``."""
    from .state_dict import load_matching

    checkpoint.require_bundle(HRMEDSEG_SAM2_ARCHITECTURE)
    config = checkpoint.config
    preprocessing = Preprocessing.recorded(checkpoint.preprocessing)
    encoder = HRMedSegEncoder(EncoderConfig.from_dict(config.get("encoder", {})), preprocessing)
    image_encoder = HRMedSegSam2ImageEncoder(encoder, Sam2NeckConfig.from_dict(config.get("neck", {})))
    model = build_sam2_base(image_encoder, config.get("sam2_config", DEFAULT_SAM2_CONFIG))
    load_matching(model, checkpoint.state, checkpoint.source)
    settings = Sam2Settings(
        config.get("sam2_config", DEFAULT_SAM2_CONFIG), bool(config.get("memory", False)), image_encoder.neck.config.to_dict()
    )
    return LoadedModel(model.eval().to(device), _sam2_metadata(model, settings, checkpoint.source, checkpoint.provenance))


def load_hrmedseg_sam2(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load an "hrmedseg_sam2" bundle written by ``save_hrmedseg_sam2``: its ``SAM2Base`` (metadata: :func:`hrmedseg_sam2_from_checkpoint`)."""
    return hrmedseg_sam2_from_checkpoint(read_checkpoint(path), device).module


__all__ = [
    "Sam2Neck",
    "Sam2NeckConfig",
    "HRMedSegSam2ImageEncoder",
    "build_hrmedseg_sam2",
    "build_hrmedseg_sam2_with_metadata",
    "hrmedseg_sam2_from_checkpoint",
    "build_sam2_base",
    "extract_sam2_decoder_state",
    "read_sam2_decoder",
    "sam2_decoder_from_checkpoint",
    "assemble_hrmedseg_sam2",
    "sam2_config_of",
    "save_hrmedseg_sam2",
    "load_hrmedseg_sam2",
]
