"""Augmented views of unlabelled images for feature distillation.

Each image gives ``views_per_image`` fixed views: a square crop at a random scale and place,
a random flip and quarter turn, and a colour jitter, resized to ``size`` x ``size``. A view is a
pure function of (seed, image index, view index), so the teacher's embedding of it never changes
and can be cached on disk like a whole image's, and a resumed run sees the same views.

Square crops need no padding, so a student and a teacher that pad differently (SAM pads with the
mean colour, LiteMedSAM with black) still see exactly the same pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import Dataset

from hrmedseg.errors import InputError

from .data import read_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewSettings:
    """How views are drawn.

    size: output side in pixels (the student's input size).
    min_scale: the smallest crop side as a fraction of the image's shorter side (log-uniform
        up to 1: a whole-image view is as likely as a 4x zoom at the default 0.25).
    jitter: brightness, contrast and saturation factors are drawn from [1 - jitter, 1 + jitter].
    """

    size: int = 1024
    min_scale: float = 0.25
    jitter: float = 0.25


def draw_view(image: np.ndarray, rng: np.random.Generator, settings: ViewSettings) -> np.ndarray:
    """(H, W, 3) uint8 -> one augmented (size, size, 3) uint8 view."""
    h, w = image.shape[:2]
    short = min(h, w)
    side = int(round(short * np.exp(rng.uniform(np.log(settings.min_scale), 0.0))))
    side = max(1, min(short, side))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(image[y : y + side, x : x + side]))
    view = crop.resize((settings.size, settings.size), Image.BILINEAR if side < settings.size else Image.BOX)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhance(view).enhance(float(rng.uniform(1 - settings.jitter, 1 + settings.jitter)))
    out = np.asarray(view)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(np.rot90(out, int(rng.integers(0, 4))))


class DistillItems(Dataset):
    """Items {"image" (3, S, S) uint8, "index", "teacher"?} of unlabelled images for distillation.

    Subclasses say which image (and view) item ``index`` is (:meth:`cache_key`) and how its
    pixels are made (:meth:`render`). With a cache, ``teacher`` is the cached embedding of that
    item (an empty tensor when not cached yet). Unreadable images give ``image`` None and are
    dropped by ``collate_distill``.
    """

    cache: Any = None

    def cache_key(self, index: int) -> tuple[Path, str | None]:
        """(image file, view name or None) under which the teacher's embedding of item ``index`` is cached."""
        raise NotImplementedError

    def render(self, image: np.ndarray, index: int) -> np.ndarray:
        """(H, W, 3) uint8 image -> the (S, S, 3) uint8 input of item ``index``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        path, view = self.cache_key(index)
        item: dict[str, Any] = {"index": index}
        if self.cache is not None:
            cached = self.cache.get(path, view)
            item["teacher"] = cached if cached is not None else torch.empty(0)
        try:
            image = read_image(path)
        except InputError as err:
            log.warning("skipping %s", err)
            item["image"] = None
            return item
        item["image"] = torch.from_numpy(np.ascontiguousarray(self.render(image, index).transpose(2, 0, 1)))
        return item


class DistillViews(DistillItems):
    """``len(paths) * views_per_image`` items: item ``i`` is view ``i % views_per_image`` of image
    ``i // views_per_image`` (see :class:`DistillItems` for the items)."""

    def __init__(self, paths: list[Path], views_per_image: int, settings: ViewSettings, seed: int = 0,
                 cache: Any | None = None) -> None:
        if views_per_image < 1:
            raise InputError(f"--views-per-image must be at least 1, got {views_per_image}")
        self.paths, self.views_per_image, self.settings, self.seed, self.cache = paths, views_per_image, settings, seed, cache

    def __len__(self) -> int:
        return len(self.paths) * self.views_per_image

    def cache_key(self, index: int) -> tuple[Path, str]:
        s = self.settings
        view = f"view{index % self.views_per_image}-seed{self.seed}-{s.size}-{s.min_scale:g}-{s.jitter:g}"
        return self.paths[index // self.views_per_image], view

    def render(self, image: np.ndarray, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index // self.views_per_image, index % self.views_per_image])
        return draw_view(image, rng, self.settings)
