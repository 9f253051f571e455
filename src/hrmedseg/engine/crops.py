"""Crop planning: which native-resolution neighbourhood, at which scale, each box is encoded in.

Conventions. Boxes are continuous ``x0, y0, x1, y1`` in native (level-0) pixels; pixel ``(r, c)``
covers ``[c, c+1) x [r, r+1)``. A :class:`Crop` is a square window of ``size`` native pixels at
``(y0, x0)`` resampled by ``scale`` (model-input pixels per native pixel, a power of two) into the
model's ``input_size`` square; native ``v`` maps to input ``(v - origin) * scale``.

Scale rule. Each box gets the largest power-of-two scale (at most ``max_upscale``) at which the
box plus its context margin spans at most half the input. Small objects are therefore enlarged
(up to ``max_upscale``) and huge ones shrunk (read from a pyramid level when the image has one).

Placement rule. At scale ``s`` crops sit on a fixed grid with stride ``size / grid_divisions``
(at most half a crop); a box whose extent is at most half a crop always fits inside one of them. Fixed positions let boxes
share a crop (one encoder call) and let later calls hit the embedding cache; among the crops
that contain a box, a greedy set cover takes as few as possible (preferring cached ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropPolicy:
    """How crops are chosen. All margins are per side.

    input_size: the model's square input (1024 for SAM and HRMedSegSAM).
    max_upscale: largest enlargement of small objects (power of two); more means finer
        boundaries for tiny objects but fewer boxes per crop (more encoder calls).
    context_fraction, min_context_px: image context around the box that the crop must include
        (fraction of the box's longer side, at least this many native pixels).
    mask_fraction, min_mask_px: how far beyond the box the output mask region reaches.
    grid_divisions: crops sit on a grid of stride ``size / grid_divisions`` (>= 2); a finer grid
        lets more boxes share a crop, at the cost of fewer exact cache hits between calls.
    """

    input_size: int = 1024
    max_upscale: float = 2.0
    context_fraction: float = 0.25
    min_context_px: float = 16.0
    mask_fraction: float = 0.1
    min_mask_px: float = 4.0
    grid_divisions: int = 4

    def __post_init__(self) -> None:
        if self.max_upscale <= 0 or math.log2(self.max_upscale) % 1:
            raise ValueError(f"max_upscale must be a power of two, got {self.max_upscale}")
        if self.grid_divisions < 2:
            raise ValueError(f"grid_divisions must be at least 2, got {self.grid_divisions}")


@dataclass(frozen=True)
class Crop:
    """A square native window ``[y0, y0 + size) x [x0, x0 + size)`` encoded at ``scale``."""

    scale: float
    y0: int
    x0: int
    size: int
    input_size: int = 1024

    def box_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) native xyxy -> (N, 4) xyxy in model-input pixels of this crop."""
        origin = np.array([self.x0, self.y0, self.x0, self.y0], np.float64)
        return (np.asarray(boxes, np.float64) - origin) * self.scale

    def input_to_native(self, boxes: np.ndarray) -> np.ndarray:
        origin = np.array([self.x0, self.y0, self.x0, self.y0], np.float64)
        return np.asarray(boxes, np.float64) / self.scale + origin

    def valid_input_shape(self, shape_yx: tuple[int, int]) -> tuple[int, int]:
        """Input pixels (h, w) that hold image content; the rest of the square is padding."""
        h = min(self.size, shape_yx[0] - self.y0)
        w = min(self.size, shape_yx[1] - self.x0)
        return min(self.input_size, math.ceil(h * self.scale)), min(self.input_size, math.ceil(w * self.scale))


#: How far small objects are enlarged where boxes come one at a time (the annotator). Batch work
#: keeps ``CropPolicy.max_upscale`` (2): fewer, larger crops, each shared by more boxes. One box at
#: a time gets a crop of its own region either way, so the finer scale costs an annotator little
#: (more encoder calls only where boxes crowd) and draws small objects' boundaries on a 2x finer
#: grid: on DSB 2018 *training* nuclei the default box model's Dice went from 0.925 to 0.929 after
#: the box and from 0.941 to 0.947 after 3 clicks (docs/benchmarks.md, "Finer crops and a faded
#: click fix").
INTERACTIVE_MAX_UPSCALE = 4.0


def interactive_policy(policy: CropPolicy) -> CropPolicy:
    """``policy`` for boxes and clicks drawn one at a time: small objects enlarged up to
    :data:`INTERACTIVE_MAX_UPSCALE` (a policy that already goes further is kept)."""
    return replace(policy, max_upscale=max(policy.max_upscale, INTERACTIVE_MAX_UPSCALE))


def _pow2_floor(v: float) -> float:
    return 2.0 ** math.floor(math.log2(v))


def box_scale(box: np.ndarray, policy: CropPolicy) -> float:
    """The crop scale for one box (see the module docstring)."""
    longest = float(max(box[2] - box[0], box[3] - box[1]))
    extent = longest + 2 * max(policy.context_fraction * longest, policy.min_context_px)
    return min(policy.max_upscale, _pow2_floor(policy.input_size / 2 / extent))


def context_window(box: np.ndarray, policy: CropPolicy, shape_yx: tuple[int, int]) -> tuple[float, float, float, float]:
    """Native window (y0, y1, x0, x1) that must lie inside the box's crop (clipped to the image)."""
    longest = float(max(box[2] - box[0], box[3] - box[1]))
    m = max(policy.context_fraction * longest, policy.min_context_px)
    return max(box[1] - m, 0.0), min(box[3] + m, shape_yx[0]), max(box[0] - m, 0.0), min(box[2] + m, shape_yx[1])


def mask_region(box: np.ndarray, crop: Crop, policy: CropPolicy, shape_yx: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer native region (y0, y1, x0, x1) whose pixels a box's mask may set."""
    longest = float(max(box[2] - box[0], box[3] - box[1]))
    m = max(policy.mask_fraction * longest, policy.min_mask_px)
    y0 = max(math.floor(box[1] - m), 0, crop.y0)
    x0 = max(math.floor(box[0] - m), 0, crop.x0)
    y1 = min(math.ceil(box[3] + m), shape_yx[0], crop.y0 + crop.size)
    x1 = min(math.ceil(box[2] + m), shape_yx[1], crop.x0 + crop.size)
    return y0, y1, x0, x1


def _axis_origins(lo: float, hi: float, extent: int, size: int, align: int, divisions: int) -> list[int]:
    """Grid origins along one axis whose window [o, o + size) contains [lo, hi]."""
    if extent <= size:
        return [0]
    stride = max(1, size // divisions)
    last = math.ceil((extent - size) / align) * align  # may pass the edge by < align: padded
    found = []
    k = max(0, math.floor((hi - size) / stride))
    while k * stride <= lo:
        o = min(k * stride, last)
        if o <= lo and hi <= o + size and o not in found:
            found.append(o)
        k += 1
    if not found:  # only when rounding pushed the window: fall back to the clamped last one
        found.append(min(max(0, math.floor(lo / align) * align), last))
    return found


def candidate_crops(box: np.ndarray, policy: CropPolicy, shape_yx: tuple[int, int]) -> list[Crop]:
    """Every grid crop at the box's scale that contains the box and its context."""
    s = box_scale(box, policy)
    size = int(round(policy.input_size / s))
    align = max(1, int(round(1 / s)))
    cy0, cy1, cx0, cx1 = context_window(box, policy, shape_yx)
    ys = _axis_origins(cy0, cy1, shape_yx[0], size, align, policy.grid_divisions)
    xs = _axis_origins(cx0, cx1, shape_yx[1], size, align, policy.grid_divisions)
    return [Crop(s, y, x, size, policy.input_size) for y in ys for x in xs]


def plan_crops(
    boxes: np.ndarray,
    shape_yx: tuple[int, int],
    policy: CropPolicy,
    is_cached: Callable[[Crop], bool] = lambda c: False,
) -> list[Crop]:
    """One crop per box (same length as ``boxes``), shared between boxes where possible.

    Greedy set cover: repeatedly take the crop that holds the most boxes not yet placed
    (ties: an already cached crop, then the top-left one), so few crops are encoded.
    """
    candidates = [candidate_crops(b, policy, shape_yx) for b in boxes]
    members: dict[Crop, list[int]] = {}
    for i, cands in enumerate(candidates):
        for c in cands:
            members.setdefault(c, []).append(i)
    open_count = {c: len(m) for c, m in members.items()}
    cached = {c: bool(is_cached(c)) for c in members}
    plan: list[Crop | None] = [None] * len(boxes)
    left = len(boxes)
    while left:
        best = max(open_count, key=lambda c: (open_count[c], cached[c], -c.y0, -c.x0, c.scale))
        for i in members[best]:
            if plan[i] is None:
                plan[i] = best
                left -= 1
                for other in candidates[i]:
                    open_count[other] -= 1
        del open_count[best]
    return plan  # type: ignore[return-value]


def group_by_crop(crops: Iterable[Crop]) -> dict[Crop, list[int]]:
    """{crop: [box indices]} in order of each crop's first box."""
    groups: dict[Crop, list[int]] = {}
    for i, c in enumerate(crops):
        groups.setdefault(c, []).append(i)
    return groups


def choose_level(levels: list[tuple[int, int]], shape_yx: tuple[int, int], downsample: float) -> int:
    """The coarsest pyramid level that is still at least as fine as ``downsample``."""
    best, best_f = 0, 1.0
    for i, (h, w) in enumerate(levels):
        f = min(shape_yx[0] / h, shape_yx[1] / w)
        if best_f < f <= downsample * 1.001:
            best, best_f = i, f
    return best


def read_crop(
    image, crop: Crop, to_float: Callable[[np.ndarray], np.ndarray], block_px: int = 2048
) -> tuple[torch.Tensor, int]:
    """Read and resample a crop's pixels: ((1, C, h_in, w_in) float tensor, pyramid level used).

    ``to_float`` maps raw (h, w, C) pixels to float32 (intensity normalisation). Upscaling reads
    the native window once; downscaling reads the best pyramid level in blocks of ``block_px``
    level pixels, averaging k x k blocks as it goes, so memory stays bounded however big the crop.
    """
    H, W = image.shape_yx
    h_nat, w_nat = min(crop.size, H - crop.y0), min(crop.size, W - crop.x0)
    h_in, w_in = crop.valid_input_shape((H, W))
    if crop.scale >= 1:
        raw = image.read(crop.y0, crop.y0 + h_nat, crop.x0, crop.x0 + w_nat)
        t = torch.from_numpy(to_float(raw)).permute(2, 0, 1)[None]
        if crop.scale > 1:
            t = F.interpolate(t, size=(h_in, w_in), mode="bilinear", align_corners=False)
        return t, 0
    d = 1.0 / crop.scale
    level = choose_level(image.levels, (H, W), d)
    lh, lw = image.levels[level]
    fy, fx = H / lh, W / lw
    k = max(1, int(math.floor(min(d / fy, d / fx) + 1e-6)))
    ly0, lx0 = int(math.floor(crop.y0 / fy)), int(math.floor(crop.x0 / fx))
    ly1, lx1 = min(lh, int(math.ceil((crop.y0 + h_nat) / fy))), min(lw, int(math.ceil((crop.x0 + w_nat) / fx)))
    step = k * max(1, block_px // k)
    rh, rw = -(-(ly1 - ly0) // k), -(-(lx1 - lx0) // k)
    reduced = None
    for by in range(ly0, ly1, step):
        for bx in range(lx0, lx1, step):
            by1, bx1 = min(by + step, ly1), min(bx + step, lx1)
            block = to_float(image.read(by, by1, bx, bx1, level=level))
            if reduced is None:
                reduced = np.zeros((rh, rw, block.shape[-1]), np.float32)
            reduced[(by - ly0) // k : (by - ly0) // k + -(-(by1 - by) // k), (bx - lx0) // k : (bx - lx0) // k + -(-(bx1 - bx) // k)] = _block_mean(block, k)
    t = torch.from_numpy(reduced).permute(2, 0, 1)[None]
    # output pixel i (centre i + 0.5 in input px) sits at native crop.y0 + (i + 0.5) * d,
    # i.e. at reduced-grid position ((native / fy) - ly0) / k (pixel-edge coordinates)
    gy = ((crop.y0 + (torch.arange(h_in) + 0.5) * d) / fy - ly0) / k
    gx = ((crop.x0 + (torch.arange(w_in) + 0.5) * d) / fx - lx0) / k
    grid = torch.stack(torch.meshgrid(2 * gx / rw - 1, 2 * gy / rh - 1, indexing="xy"), dim=-1)[None].float()
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False), level


def _block_mean(block: np.ndarray, k: int) -> np.ndarray:
    """(h, w, C) -> (ceil(h/k), ceil(w/k), C) means over k x k blocks (partial edge blocks too)."""
    if k == 1:
        return block
    h, w, c = block.shape
    ph, pw = -(-h // k) * k, -(-w // k) * k
    if (ph, pw) != (h, w):
        block = np.pad(block, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    return block.reshape(ph // k, k, pw // k, k, c).mean(axis=(1, 3), dtype=np.float32)


def logits_to_native(
    low_res_logits: torch.Tensor,
    crop: Crop,
    region: tuple[int, int, int, int],
    threshold: float = 0.0,
    band_pixels: int = 2**22,
) -> np.ndarray:
    """Threshold a mask's low-res logits at native resolution inside ``region`` only.

    low_res_logits: (h_lr, w_lr) logits covering the crop's full input square (256 x 256 for SAM).
    region: native (y0, y1, x0, x1). Each native pixel centre is mapped into the logit grid and
    the logits are interpolated bilinearly there, then thresholded: boundaries are as smooth as
    the logit field at any enlargement, with no nearest-neighbour blocks. Large regions go in
    row bands of ``band_pixels`` to bound memory. Returns a bool (y1 - y0, x1 - x0) array.
    """
    y0, y1, x0, x1 = region
    lr = low_res_logits.reshape(1, 1, *low_res_logits.shape[-2:]).float()
    gx = _native_grid(x0, x1, crop.x0, crop)
    out = np.zeros((y1 - y0, x1 - x0), bool)
    rows = max(1, band_pixels // max(1, x1 - x0))
    for r0 in range(y0, y1, rows):
        r1 = min(r0 + rows, y1)
        out[r0 - y0 : r1 - y0] = (_sampled(lr, crop, gx, r0, r1) > threshold).cpu().numpy()
    return out


def _sampled(lr: torch.Tensor, crop: Crop, gx: torch.Tensor, y0: int, y1: int) -> torch.Tensor:
    """(y1 - y0, len(gx)) logits of ``lr`` (1, 1, h_lr, w_lr), bilinearly sampled at the native
    pixel centres of rows y0..y1-1 and the columns whose grid coordinates are ``gx``."""
    grid = _sample_grid(gx, _native_grid(y0, y1, crop.y0, crop))[None].to(lr.device)
    return F.grid_sample(lr, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]


def _sample_grid(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """(len(gy), len(gx), 2) float32 grid_sample coordinates (x, y) from float64 axis coordinates.

    Each axis is rounded to float32 once and broadcast into place, so no float64 (rows, cols, 2)
    array is made: on a 10000-pixel object that intermediate was the mask step's peak memory.
    """
    grid = torch.empty(len(gy), len(gx), 2, dtype=torch.float32)
    grid[..., 0] = gx.to(torch.float32)[None, :]
    grid[..., 1] = gy.to(torch.float32)[:, None]
    return grid


def _native_grid(lo: int, hi: int, origin: int, crop: Crop) -> torch.Tensor:
    """grid_sample coordinates (-1..1 over the crop's input square) of native pixel centres lo..hi-1."""
    return 2 * ((torch.arange(lo, hi, dtype=torch.float64) + 0.5 - origin) * crop.scale / crop.input_size) - 1


def logits_to_native_batch(
    low_res_logits: torch.Tensor,
    crop: Crop,
    regions: list[tuple[int, int, int, int]],
    threshold: float = 0.0,
    band_pixels: int = 2**22,
) -> list[np.ndarray]:
    """:func:`logits_to_native` for N masks of one crop, in one resampling call where small.

    low_res_logits: (N, 1, h_lr, w_lr) or (N, h_lr, w_lr); regions: N native (y0, y1, x0, x1).
    The regions are padded to the largest one and sampled in one ``grid_sample`` with one
    device-to-host copy (the per-pixel arithmetic is the same, so the masks are identical);
    this matters on a GPU, where a copy per mask costs more than the sampling. When the padded
    batch would exceed ``band_pixels``, each mask goes through :func:`logits_to_native`.
    """
    lr = low_res_logits.reshape(len(regions), 1, *low_res_logits.shape[-2:]).float()
    heights = [max(0, y1 - y0) for y0, y1, _, _ in regions]
    widths = [max(0, x1 - x0) for _, _, x0, x1 in regions]
    rows, cols = max(heights, default=0), max(widths, default=0)
    if len(regions) * rows * cols > band_pixels:
        return [logits_to_native(lr[i, 0], crop, r, threshold, band_pixels) for i, r in enumerate(regions)]
    grid = torch.zeros(len(regions), rows, cols, 2, dtype=torch.float32)
    for i, (y0, y1, x0, x1) in enumerate(regions):
        gx, gy = _native_grid(x0, x1, crop.x0, crop), _native_grid(y0, y1, crop.y0, crop)
        grid[i, : len(gy), : len(gx)] = _sample_grid(gx, gy)
    sampled = F.grid_sample(lr, grid.to(lr.device), mode="bilinear", padding_mode="border", align_corners=False)
    above = (sampled[:, 0] > threshold).cpu().numpy()
    return [above[i, :h, :w] for i, (h, w) in enumerate(zip(heights, widths))]


def native_logits(low_res_logits: torch.Tensor, crop: Crop, window: tuple[int, int, int, int]) -> np.ndarray:
    """(y1 - y0, x1 - x0) float32 logits at the native pixels of ``window`` (y0, y1, x0, x1).

    The same bilinear sampling per pixel as :func:`logits_to_native_batch` (each pixel's grid
    coordinate depends on its own index only), so ``native_logits(...) > threshold`` is the mask
    there; low_res_logits: (h_lr, w_lr), (1, h_lr, w_lr) or (1, 1, h_lr, w_lr).
    """
    y0, y1, x0, x1 = window
    lr = low_res_logits.reshape(1, 1, *low_res_logits.shape[-2:]).float()
    return _sampled(lr, crop, _native_grid(x0, x1, crop.x0, crop), y0, y1).cpu().numpy()
