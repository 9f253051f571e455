"""Intensity handling: raw microscopy pixels -> the 0..255 RGB the image encoder expects.

- uint8 with 1 or 3 channels (fundus photos, RGB histology, 8-bit fluorescence) passes through.
- Everything else (uint16, other integers, float) is scaled per channel: ``lo`` -> 0 and
  ``hi`` -> 255, clipped, where (lo, hi) are given (``contrast_limits``, e.g. a napari layer's)
  or are percentiles (default 1 and 99.8) of the whole image, estimated once per image from a
  small pyramid level, the full image when it is small, or a grid of sample blocks.
- One channel becomes grey RGB (repeated); two channels become red and green (blue zero).

This is the one pixel pipeline: the engine (box prompts and prompt-free) and the training data
reader (``hrmedseg.training.data``) both turn raw pixels into model RGB with
:func:`compute_scaling` and :meth:`ChannelScaling.apply`. Training reads whole images with
:func:`whole_image_rgb` under :data:`DEFAULT_INTENSITY` (per-channel percentiles 1 and 99.8),
which is also the box and prompt-free engines' default.
Without a user's channel choice (training), :func:`default_channels` picks the channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError

STATS_PIXELS = 2048 * 2048
SAMPLE_GRID = 8
SAMPLE_BLOCK = 128


@dataclass(frozen=True)
class IntensityOptions:
    """percentiles: (low, high) used when no contrast limits are given.
    contrast_limits: (lo, hi) for every channel, or one (lo, hi) per selected channel.
    rescale_uint8: scale uint8 images too (off: uint8 passes through unchanged).
    """

    percentiles: tuple[float, float] = (1.0, 99.8)
    contrast_limits: tuple | None = None
    rescale_uint8: bool = False


@dataclass(frozen=True)
class ChannelScaling:
    """Per-channel affine map to 0..255; ``None`` limits mean pass-through."""

    lo: tuple[float, ...] | None
    hi: tuple[float, ...] | None

    @property
    def key(self) -> str:
        if self.lo is None:
            return "raw"
        return "lin:" + ",".join(f"{a:.6g}-{b:.6g}" for a, b in zip(self.lo, self.hi))

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """(h, w, C) raw -> (h, w, 3) float32 in 0..255."""
        x = raw.astype(np.float32, copy=False)
        if self.lo is not None:
            lo = np.asarray(self.lo, np.float32)
            span = np.maximum(np.asarray(self.hi, np.float32) - lo, 1e-12)
            x = np.clip((x - lo) * (255.0 / span), 0.0, 255.0)
        return to_rgb(x)


# The one default of training, the box engine and the prompt-free engine: each non-uint8 channel's
# 1st..99.8th percentile -> 0..255, so a model sees in use what it saw in training.
DEFAULT_INTENSITY = IntensityOptions()


def to_rgb(x: np.ndarray) -> np.ndarray:
    """(h, w, C) with C in 1..3 -> (h, w, 3): grey repeated, two channels as red and green."""
    c = x.shape[-1]
    if c == 3:
        return x
    if c == 1:
        return np.repeat(x, 3, axis=-1)
    if c == 2:
        return np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1)
    raise InputError(f"{c} channels cannot be shown as RGB; select 1 to 3 channels")


def _stats_sample(image) -> np.ndarray:
    """(n, C) pixels that represent the whole image, read cheaply."""
    for level, (h, w) in enumerate(image.levels):
        if h * w <= STATS_PIXELS:
            return image.read(0, h, 0, w, level=level).reshape(-1, image.n_channels)
    h, w = image.shape_yx
    blocks = []
    for gy in range(SAMPLE_GRID):
        for gx in range(SAMPLE_GRID):
            y = int((gy + 0.5) * h / SAMPLE_GRID) - SAMPLE_BLOCK // 2
            x = int((gx + 0.5) * w / SAMPLE_GRID) - SAMPLE_BLOCK // 2
            y, x = max(0, min(y, h - SAMPLE_BLOCK)), max(0, min(x, w - SAMPLE_BLOCK))
            blocks.append(image.read(y, min(h, y + SAMPLE_BLOCK), x, min(w, x + SAMPLE_BLOCK)).reshape(-1, image.n_channels))
    return np.concatenate(blocks)


HISTOGRAM_MAX_BINS = 2**20


def _order_statistics(counts: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Values (bin indices) at 0-based ``ranks`` of the sorted sample whose histogram is ``counts``."""
    return np.searchsorted(np.cumsum(counts), ranks, side="right")


def histogram_percentiles(sample: np.ndarray, percentiles: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Per-channel percentiles of an integer (n, C) sample, equal to ``np.percentile``'s (linear method).

    Sorting (``np.percentile``'s partition of a float64 copy) took most of a first box's time
    besides the encoder on a 2048^2 image; a histogram (``np.bincount``) finds the same two order
    statistics around each virtual index ``(n - 1) * p / 100`` in one pass, and they are blended
    with numpy's own formula, so the result is the same float64. Channels whose value range
    exceeds ``HISTOGRAM_MAX_BINS`` are sorted as before. Returns one (C,) array per percentile.
    """
    n, c = sample.shape
    q = np.true_divide(np.asarray(percentiles, np.float64), 100)
    virtual = (n - 1) * q
    below = np.floor(virtual)
    gamma = virtual - below
    ranks = np.stack([below, np.minimum(below + 1, n - 1)]).astype(np.int64)  # (2, P)
    out = np.empty((len(q), c), np.float64)
    for ch in range(c):
        column = sample[:, ch]
        low, high = int(column.min()), int(column.max())
        if high - low >= HISTOGRAM_MAX_BINS:
            out[:, ch] = np.percentile(column.astype(np.float64), np.asarray(percentiles, np.float64))
            continue
        counts = np.bincount((column.astype(np.int64) - low) if low else column, minlength=high - low + 1)
        a, b = (_order_statistics(counts, r).astype(np.float64) + low for r in ranks)
        diff = b - a
        out[:, ch] = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp
    return tuple(out)


def compute_scaling(image, options: IntensityOptions = IntensityOptions()) -> ChannelScaling:
    """The intensity map for ``image`` (a LazyImage) under ``options``."""
    c = image.n_channels
    if options.contrast_limits is not None:
        limits = np.asarray(options.contrast_limits, np.float64)
        if limits.shape == (2,):
            limits = np.tile(limits, (c, 1))
        if limits.shape != (c, 2) or not np.all(np.isfinite(limits)) or np.any(limits[:, 1] <= limits[:, 0]):
            raise InputError(
                f"contrast limits {options.contrast_limits!r} must be (lo, hi) with hi > lo, or one pair per channel ({c})"
            )
        return ChannelScaling(tuple(limits[:, 0]), tuple(limits[:, 1]))
    if image.dtype == np.uint8 and not options.rescale_uint8:
        return ChannelScaling(None, None)
    p_lo, p_hi = options.percentiles
    if not 0 <= p_lo < p_hi <= 100:
        raise InputError(f"percentiles {options.percentiles!r} must satisfy 0 <= low < high <= 100")
    sample = _stats_sample(image)
    if sample.dtype.kind in "iub" and sample.size:
        lo, hi = histogram_percentiles(sample, (p_lo, p_hi))
    else:
        sample = sample.astype(np.float64)
        sample = np.where(np.isfinite(sample), sample, np.nan)
        # Percentiles 0 and 100 are the min and max, found without sorting (training's default).
        lo = np.nanmin(sample, axis=0) if p_lo == 0 else np.nanpercentile(sample, p_lo, axis=0)
        hi = np.nanmax(sample, axis=0) if p_hi == 100 else np.nanpercentile(sample, p_hi, axis=0)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    hi = np.where(np.isfinite(hi) & (hi > lo), hi, lo + 1.0)  # flat channel: avoid division by zero
    return ChannelScaling(tuple(float(v) for v in lo), tuple(float(v) for v in hi))


def default_channels(n_source_channels: int) -> tuple[int, ...]:
    """The channels read when nobody chose them (training data): all of 1, 2 or 3; the first 3 of 4.

    Two channels are shown as red and green, as the engine shows a two-channel choice; a fourth
    channel is taken for alpha and dropped (the readers drop uint8 RGBA alpha the same way).
    """
    if n_source_channels in (1, 2, 3):
        return tuple(range(n_source_channels))
    if n_source_channels == 4:
        return (0, 1, 2)
    raise InputError(f"{n_source_channels} channels cannot be shown as RGB; expected 1 to 4")


def whole_image_rgb(image, options: IntensityOptions = DEFAULT_INTENSITY) -> np.ndarray:
    """A whole ``image`` (a LazyImage, level 0) -> (H, W, 3) uint8 model pixels.

    The scaling comes from :func:`compute_scaling` (statistics of the image itself when it has at
    most ``STATS_PIXELS`` pixels, sampled otherwise, as in the engine); values are rounded to
    integers as the prompt-free engine rounds them.
    """
    h, w = image.shape_yx
    scaling = compute_scaling(image, options)
    rgb = scaling.apply(image.read(0, h, 0, w))
    if scaling.lo is None:  # uint8 pass-through: already integers in 0..255
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    return np.round(rgb).astype(np.uint8)


def normalise(raw: np.ndarray, options: IntensityOptions | None = None, scaling: ChannelScaling | None = None) -> np.ndarray:
    """Convenience for arrays: (h, w, C) raw -> (h, w, 3) float32 0..255."""
    if scaling is None:
        from ..io.readers import ArrayImage

        scaling = compute_scaling(ArrayImage(raw, axes="YXC", channel=list(range(raw.shape[-1]))), options or IntensityOptions())
    return scaling.apply(raw)


__all__: Sequence[str] = [
    "DEFAULT_INTENSITY",
    "IntensityOptions",
    "ChannelScaling",
    "compute_scaling",
    "default_channels",
    "histogram_percentiles",
    "normalise",
    "to_rgb",
    "whole_image_rgb",
]
