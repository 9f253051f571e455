"""The distillation teacher (a SAM image encoder) and its on-disk embedding cache.

The teacher is by far the most expensive part of distillation (SAM ViT-H: 2.7 TMACs per image,
about 400 times the student), and its output for a given image never changes: the cache stores
each image's embedding once (float16, (256, 64, 64) = 2 MiB at 1024 x 1024) and every later
epoch reads it instead of running the teacher.
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
    """
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
    from hrmedseg.models.encoder_loading import unwrap_state_dict
    from hrmedseg.models.sam import sam_variant
    from hrmedseg.weights.bundle import read_checkpoint

    path = Path(spec)
    state = unwrap_state_dict(read_checkpoint(path), str(path))
    variant = sam_variant(state)
    if variant is None:
        if any(k.startswith("image_encoder.trunk.") for k in state):
            raise WeightsError(f"{path} is a SAM2 checkpoint; SAM2 teachers are not supported yet, use a SAM ViT-H/L/B file")
        raise WeightsError(f"{path} is not a SAM checkpoint (no ViT image encoder 'image_encoder.patch_embed.*')")
    if img_size != SAM_INPUT_SIZE:
        raise InputError(f"a SAM {variant} teacher takes {SAM_INPUT_SIZE} x {SAM_INPUT_SIZE} inputs; drop --img-size {img_size}")
    teacher = build_sam_vit(variant)
    encoder_state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    teacher.load_state_dict(encoder_state, strict=True)
    digest = hashlib.sha1(f"{path.resolve()}|{path.stat().st_size}|{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    return teacher.eval().requires_grad_(False), f"sam-{variant}-{digest}@{img_size}"


class TeacherCache:
    """Teacher embeddings on disk, one float16 file per (image file, teacher, input size).

    Keys include the image's path, size and modification time, so an edited image is recomputed.
    Files are written atomically: a run killed while writing leaves no half file behind.
    """

    def __init__(self, root: str | os.PathLike, teacher_id: str) -> None:
        self.root = Path(root)
        self.teacher_id = teacher_id
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, image_path: str | os.PathLike) -> str:
        p = Path(image_path)
        st = p.stat()
        return hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.teacher_id}".encode()).hexdigest()

    def path(self, image_path: str | os.PathLike) -> Path:
        k = self.key(image_path)
        return self.root / k[:2] / f"{k}.pt"

    def get(self, image_path: str | os.PathLike) -> torch.Tensor | None:
        path = self.path(image_path)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed
            path.unlink(missing_ok=True)
            return None

    def put(self, image_path: str | os.PathLike, embedding: torch.Tensor) -> None:
        """Store one (256, h, w) embedding as float16."""
        with atomic_path(self.path(image_path)) as tmp:
            torch.save(embedding.detach().to("cpu", torch.float16).clone(), tmp)

    def __contains__(self, image_path: str | os.PathLike) -> bool:
        return self.path(image_path).exists()
