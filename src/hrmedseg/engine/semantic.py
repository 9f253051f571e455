"""Prompt-free segmentation (HRMedSeg) of images of any size, the way the model was trained.

    from hrmedseg.engine.semantic import SemanticPredictor
    predictor = SemanticPredictor("nuclei_hrmedseg.pt")        # a bundle path, name or module
    labels = predictor.segment("slide.ome.tif")                 # (H, W) labels, native size

A fine-tuned HRMedSeg bundle records how its training inputs were made (``provenance``, written
by ``hrmedseg.training.finetune``): ``input_mode``, ``img_size``, ``scale``. Inference repeats it:

- ``crop``: training saw native-resolution ``img_size`` crops of images rescaled by ``scale``.
  The image is rescaled by ``scale`` (window by window, never as a whole) and cut into
  overlapping ``img_size`` tiles (bottom/right tiles padded with the pixel mean, as in
  training). Each scaled pixel takes its logits from the tile whose kept part holds it: tile
  borders, where the model lacks context, are dropped. Logits are resampled back to native
  resolution and thresholded there.
- ``fit``: training saw the whole image resized to an ``img_size`` long side, padded bottom/right
  with the pixel mean. Inference does the same (reading a pyramid level when there is one),
  crops the padding off the logits and resamples the LOGITS bilinearly to native size, so the
  threshold is applied at native resolution (smooth boundaries, not blocky upsampled masks).

All resizing is PIL-style bilinear (antialiased when shrinking), as training's ``_resize``; it is
computed window by window from global coordinates, so tiles agree exactly where they meet.
Pixels become RGB 0..255 through the pipeline training reads with (``engine.intensity``,
``DEFAULT_INTENSITY``): uint8 grey/RGB pass through, other types are scaled per channel
between their 1st and 99.8th percentiles (estimated from a pyramid level or sample blocks for
huge images) and rounded; grey is repeated to three channels, two channels are red and green.

Output: one sigmoid channel per class. With one channel, ``segment`` returns instances (int32
connected components of the foreground, 8-connected). With several, a uint8 class image where
class ``c`` (0-based channel) is written as ``c + 1`` and later classes overwrite earlier ones:
for nested classes such as disc ⊃ cup (``classes "disc:>=1,cup:2"``), 1 = disc rim (disc
without cup), 2 = cup, the meaning of Drishti-GS's masks.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import HRMedSegError, InputError, WeightsError
from ..io.readers import LazyImage, open_image
from ..weights.checkpoint import Checkpoint, read_checkpoint
from .intensity import DEFAULT_INTENSITY, ChannelScaling, IntensityOptions, compute_scaling

log = logging.getLogger(__name__)

PROMPT_FREE_ARCHITECTURE = "hrmedseg"
INPUT_MODES = ("crop", "fit")
# Native block size for resampling 'fit' logits to native resolution (bounds memory per step).
NATIVE_BLOCK = 2048


class Cancelled(HRMedSegError):
    """``cancel.is_set()`` became true during prediction; nothing partial is returned."""


@dataclass(frozen=True)
class InputGeometry:
    """How model inputs are made from an image (must match training).

    mode: "crop" (tiles at native resolution after rescaling by ``scale``) or "fit" (whole
        image resized to an ``img_size`` long side and padded).
    img_size: side of the square model input (multiple of 16).
    scale: 'crop' only: factor applied to the image before tiling (2 = enlarge twice).
    overlap: 'crop' only: scaled pixels shared by neighbouring tiles; None: ``img_size // 4``.
        Each tile keeps its central part, so about ``overlap / 2`` pixels of every inner tile
        border are discarded.
    """

    mode: str = "crop"
    img_size: int = 1024
    scale: float = 1.0
    overlap: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in INPUT_MODES:
            raise InputError(f"input mode {self.mode!r} is not one of {', '.join(INPUT_MODES)}")
        if not isinstance(self.img_size, (int, np.integer)) or self.img_size < 16 or self.img_size % 16:
            raise InputError(f"img_size {self.img_size!r} must be a positive multiple of 16")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise InputError(f"scale {self.scale!r} must be a positive number")
        if self.overlap is not None and not 0 <= self.overlap < self.img_size // 2:
            raise InputError(f"tile overlap {self.overlap!r} must be >= 0 and below half the tile size ({self.img_size})")

    @property
    def tile_overlap(self) -> int:
        return self.img_size // 4 if self.overlap is None else int(self.overlap)

    @classmethod
    def from_provenance(cls, provenance: Mapping[str, Any] | None, default_img_size: int, source: str = "model") -> "InputGeometry":
        """Read ``input_mode``, ``img_size`` and ``scale`` of a fine-tuning run's provenance.

        Missing keys (bundles not written by fine-tuning) take 'crop', the model's
        ``img_size`` and scale 1, with a log message; malformed ones raise WeightsError.
        """
        prov = dict(provenance or {})
        missing = [k for k in ("input_mode", "img_size", "scale") if prov.get(k) is None]
        if missing:
            log.info("%s: provenance lacks %s; assuming crop tiles of %d at scale 1", source, ", ".join(missing), default_img_size)
        try:
            mode = str(prov.get("input_mode") or "crop")
            img_size = int(prov.get("img_size") or default_img_size)
            scale = float(prov.get("scale") if prov.get("scale") is not None else 1.0)
            return cls(mode, img_size, 1.0 if mode == "fit" else scale)
        except (InputError, TypeError, ValueError) as err:
            raise WeightsError(f"{source}: its provenance has unusable input settings ({err})") from err


def resample_weights(n_in: int, n_out: int, o0: int, o1: int) -> tuple[int, int, np.ndarray]:
    """Rows ``o0:o1`` of the (n_out, n_in) bilinear resampling matrix, as PIL's BILINEAR resize.

    Returns ``(j0, j1, W)``: the source range the rows touch and W of shape (o1 - o0, j1 - j0),
    rows summing to 1. Output pixel ``i`` is centred at source position ``(i + 0.5) * n_in /
    n_out``; when shrinking, the triangle filter is widened by the shrink factor (antialiasing).
    Being a function of global coordinates, any window of the result equals that window of the
    whole resized image.
    """
    ratio = n_in / n_out
    support = max(ratio, 1.0)  # triangle radius in source pixels
    centres = (np.arange(o0, o1, dtype=np.float64) + 0.5) * ratio
    lo = np.maximum(np.floor(centres - support + 0.5).astype(np.int64), 0)
    hi = np.minimum(np.floor(centres + support + 0.5).astype(np.int64), n_in)
    taps = lo[:, None] + np.arange(int((hi - lo).max()) if len(lo) else 0)[None]
    w = np.clip(1.0 - np.abs((taps + 0.5 - centres[:, None]) / support), 0.0, None)
    w[taps >= hi[:, None]] = 0.0
    w /= np.maximum(w.sum(1, keepdims=True), 1e-12)
    j0, j1 = int(lo.min()), int(hi.max())
    out = np.zeros((o1 - o0, j1 - j0), np.float32)
    rows = np.broadcast_to(np.arange(o1 - o0)[:, None], taps.shape)
    valid = taps < hi[:, None]
    np.add.at(out, (rows[valid], taps[valid] - j0), w[valid])
    return j0, j1, out


def _resample(x: torch.Tensor, wy: np.ndarray | None, wx: np.ndarray | None) -> torch.Tensor:
    """(C, h, w) -> (C, oh, ow) = Wy @ x @ Wx^T; None leaves that axis as it is."""
    if wy is not None:
        x = torch.matmul(torch.from_numpy(wy).to(x.device, x.dtype), x)
    if wx is not None:
        x = torch.matmul(x, torch.from_numpy(wx).to(x.device, x.dtype).T)
    return x


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of ``tile`` pixels covering ``n`` with at least ``overlap`` shared pixels."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


def kept_bounds(starts: Sequence[int], n: int, tile: int) -> list[int]:
    """Boundaries [0, b1, ..., n]: tile k keeps [b_k, b_k+1), cut mid-way through each overlap."""
    inner = [(starts[k + 1] + min(starts[k] + tile, n)) // 2 for k in range(len(starts) - 1)]
    return [0, *inner, n]


Window = tuple[int, int, int, int]  # (y0, y1, x0, x1) native pixels, half-open


def _starts_in(within: Window | None, y: int, x: int) -> bool:
    return within is None or (within[0] <= y < within[1] and within[2] <= x < within[3])


def assemble_labels(shape_yx: tuple[int, int], num_classes: int, blocks: Iterable[tuple[int, int, int, int, np.ndarray]]) -> np.ndarray:
    """The (H, W) label image of :meth:`SemanticPredictor.segment` from its thresholded blocks.

    ``blocks``: (y0, y1, x0, x1, block) as :meth:`SemanticPredictor.label_blocks` yields them,
    disjoint and covering the image, in any order and from any number of processes. One class:
    bool foreground blocks, labelled here as a whole (8-connected), so an object cut by a block
    border is one object; several classes: uint8 class blocks, pasted.
    """
    if num_classes == 1:
        foreground = np.zeros(shape_yx, bool)
        for y0, y1, x0, x1, block in blocks:
            foreground[y0:y1, x0:x1] = block
        from scipy import ndimage

        labels, _ = ndimage.label(foreground, structure=np.ones((3, 3), bool), output=np.int32)
        return labels
    classes = np.zeros(shape_yx, np.uint8)
    for y0, y1, x0, x1, block in blocks:
        classes[y0:y1, x0:x1] = block
    return classes


def _native_ranges(n_native: int, n_scaled: int, bounds: Sequence[int]) -> list[tuple[int, int]]:
    """Native pixel ranges whose (scaled-space) centres fall in each kept range."""
    centres = (np.arange(n_native) + 0.5) * (n_scaled / n_native)
    owner = np.searchsorted(np.asarray(bounds[1:-1]), centres, side="right")
    edges = np.searchsorted(owner, np.arange(len(bounds)), side="left")
    return [(int(edges[k]), int(edges[k + 1])) for k in range(len(bounds) - 1)]


def _class_names(model: nn.Module, provenance: Mapping[str, Any]) -> list[str]:
    names = getattr(model, "class_names", None)
    if names:
        return list(names)
    spec = provenance.get("classes")
    n = int(getattr(model, "num_classes"))
    if isinstance(spec, str) and spec:
        parsed = [part.split(":", 1)[0].strip() for part in spec.split(",")]
        if len(parsed) == n:
            return parsed
    return ["foreground"] if n == 1 else [f"class{c + 1}" for c in range(n)]


def read_model_checkpoint(spec: str | os.PathLike) -> Checkpoint:
    """The checkpoint a weights path or registry name points to, read once (see ``Checkpoint.kind``)."""
    from ..models.loading import resolve_spec

    return read_checkpoint(resolve_spec(spec))


class NotPromptFreeError(WeightsError):
    """The weights hold a model that needs prompts (boxes), not a prompt-free HRMedSeg."""


class SemanticPredictor:
    """Prompt-free HRMedSeg inference on images of any size, matching the model's training.

    Args:
        model: an "hrmedseg" bundle path or registry name (its provenance gives the input
            geometry), or an ``HRMedSeg``-like module (``num_classes``, ``preprocessing``,
            ``img_size``, forward (B, 3, S, S) -> (B, C2, S, S) logits).
        device: "auto" (CUDA, then MPS, then CPU) or a torch device string.
        geometry: overrides the geometry read from the bundle (needed for training settings
            a module does not carry; default for modules: crop tiles of ``img_size``, scale 1).
        provenance: for a module, the training provenance to read the geometry from.
        intensity: how non-uint8 pixels become 0..255 (default: per-channel percentiles 1 and 99.8, as training).
        tile_overlap: 'crop' tile overlap in scaled pixels (default ``img_size // 4``).
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        device: str | torch.device = "auto",
        geometry: InputGeometry | None = None,
        provenance: Mapping[str, Any] | None = None,
        intensity: IntensityOptions | None = None,
        tile_overlap: int | None = None,
    ) -> None:
        from .predictor import resolve_device

        self.device = resolve_device(device)
        if isinstance(model, nn.Module):
            source = type(model).__name__
            prov = dict(provenance or {})
        else:
            source = str(model)
            checkpoint = read_model_checkpoint(model)
            kind = checkpoint.kind if checkpoint.is_bundle else "unknown"
            if kind != PROMPT_FREE_ARCHITECTURE:
                raise NotPromptFreeError(
                    f"{model} holds a '{kind}' model, not a prompt-free HRMedSeg ('{PROMPT_FREE_ARCHITECTURE}' bundle); "
                    f"box-prompt models need boxes (BoxPredictor, or hrmedseg segment --boxes)"
                )
            from ..models.hrmedseg_model import hrmedseg_from_checkpoint

            model, metadata = hrmedseg_from_checkpoint(checkpoint)
            del checkpoint  # its tensors now live in the model
            prov = dict(metadata.provenance)
            if provenance:
                prov.update(provenance)
        for attr in ("num_classes", "preprocessing"):
            if not hasattr(model, attr):
                raise InputError(f"{source} is not an HRMedSeg-like model: it has no {attr}")
        self.model = model.eval().to(self.device)
        self.source = source
        self.provenance = prov
        default_size = int(getattr(model, "img_size", 1024))
        geometry = geometry or InputGeometry.from_provenance(prov, default_size, source)
        if tile_overlap is not None:
            geometry = InputGeometry(geometry.mode, geometry.img_size, geometry.scale, tile_overlap)
        self.geometry = geometry
        self.intensity = intensity or DEFAULT_INTENSITY
        self.class_names = _class_names(model, prov)
        self._scalings: dict[str, ChannelScaling] = {}
        self.model_calls = 0

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    # ------------------------------------------------------------------ pixels

    def scaling(self, image: LazyImage) -> ChannelScaling:
        key = image.source_key
        if key not in self._scalings:
            self._scalings[key] = compute_scaling(image, self.intensity)
        return self._scalings[key]

    def _read_rgb(self, image: LazyImage, rows: tuple[int, int], cols: tuple[int, int], level: int = 0) -> torch.Tensor:
        """(3, h, w) float32 0..255, integer-valued as training's uint8 images."""
        raw = image.read(rows[0], rows[1], cols[0], cols[1], level=level)
        rgb = np.round(self.scaling(image).apply(raw))
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))

    def _resized_window(
        self, image: LazyImage, level: int, out_shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
    ) -> torch.Tensor:
        """Window ``rows x cols`` of ``level`` resized to ``out_shape``: (3, h, w) 0..255."""
        h, w = image.levels[level]
        (oh, ow) = out_shape
        if (oh, ow) == (h, w):
            return self._read_rgb(image, rows, cols, level)
        y0, y1, wy = resample_weights(h, oh, *rows)
        x0, x1, wx = resample_weights(w, ow, *cols)
        window = self._read_rgb(image, (y0, y1), (x0, x1), level)
        return _resample(window, wy, wx).round_().clamp_(0, 255)  # PIL rounds uint8 results

    def _run_model(self, rgb: torch.Tensor) -> torch.Tensor:
        """(3, h, w) 0..255 -> (C2, h, w) logits, padded to the square input as in training."""
        size = self.geometry.img_size
        h, w = rgb.shape[-2:]
        pad_value = torch.tensor(self.model.preprocessing.pad_value, dtype=torch.float32)
        x = pad_value.view(3, 1, 1).repeat(1, size, size)
        x[:, :h, :w] = rgb
        x = self.model.preprocessing.normalize(x[None].to(self.device))
        with torch.inference_mode():
            logits = self.model(x)
        self.model_calls += 1
        if logits.shape[-2:] != (size, size) or logits.shape[1] != self.num_classes:
            raise HRMedSegError(f"{self.source} returned logits of shape {tuple(logits.shape)} for a (1, 3, {size}, {size}) input")
        return logits[0, :, :h, :w].float()

    # ------------------------------------------------------------------ tiling

    def _blocks(self, image: LazyImage, progress, cancel, within: Window | None = None) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
        """Disjoint native blocks (y0, y1, x0, x1, logits (C2, h, w)) covering the image.

        ``within`` (y0, y1, x0, x1): only the model calls whose kept native block starts in this
        window (the first pixel of a 'fit' image's one call is (0, 0)). Windows that tile the
        image split its model calls into disjoint sets whose blocks, together, are the whole
        image's: how a batch run cuts one slide into tile tasks without seams.
        """
        if self.geometry.mode == "fit":
            yield from self._fit_blocks(image, progress, cancel, within)
        else:
            yield from self._crop_blocks(image, progress, cancel, within)

    def _check_cancel(self, cancel) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("prediction cancelled")

    def _crop_blocks(self, image: LazyImage, progress, cancel, within: Window | None = None):
        g = self.geometry
        h, w = image.shape_yx
        hs, ws = max(1, round(h * g.scale)), max(1, round(w * g.scale))
        ys, xs = tile_starts(hs, g.img_size, g.tile_overlap), tile_starts(ws, g.img_size, g.tile_overlap)
        if len(ys) > 1 or len(xs) > 1:
            # A native pixel's logits are resampled from scaled pixels up to this far from its centre.
            reach = math.ceil(max(hs / h, ws / w, 1.0)) + 2
            if g.tile_overlap < 2 * reach:
                raise InputError(f"tile overlap {g.tile_overlap} is too small for scale {g.scale}; use at least {2 * reach}")
        yb, xb = kept_bounds(ys, hs, g.img_size), kept_bounds(xs, ws, g.img_size)
        ny, nx = _native_ranges(h, hs, yb), _native_ranges(w, ws, xb)
        total, done = len(ys) * len(xs), 0
        for ty, sy in enumerate(ys):
            for tx, sx in enumerate(xs):
                self._check_cancel(cancel)
                (y0, y1), (x0, x1) = ny[ty], nx[tx]
                if y1 > y0 and x1 > x0 and _starts_in(within, y0, x0):
                    tile_rows = (sy, min(sy + g.img_size, hs))
                    tile_cols = (sx, min(sx + g.img_size, ws))
                    rgb = self._resized_window(image, 0, (hs, ws), tile_rows, tile_cols)
                    logits = self._run_model(rgb)
                    yield (y0, y1, x0, x1, self._to_native(logits, (hs, ws), (h, w), (y0, y1), (x0, x1), (sy, sx)))
                done += 1
                if progress is not None:
                    progress(done, total)

    def _fit_blocks(self, image: LazyImage, progress, cancel, within: Window | None = None):
        g = self.geometry
        h, w = image.shape_yx
        if not _starts_in(within, 0, 0):
            return
        factor = g.img_size / max(h, w)
        fh, fw = max(1, round(h * factor)), max(1, round(w * factor))
        # The smallest pyramid level that is still at least the model's input size.
        level = max((i for i, (lh, lw) in enumerate(image.levels) if lh >= fh and lw >= fw), default=0)
        self._check_cancel(cancel)
        rgb = self._resized_window(image, level, (fh, fw), (0, fh), (0, fw))
        logits = self._run_model(rgb)
        if progress is not None:
            progress(1, 1)
        for y0 in range(0, h, NATIVE_BLOCK):
            for x0 in range(0, w, NATIVE_BLOCK):
                y1, x1 = min(y0 + NATIVE_BLOCK, h), min(x0 + NATIVE_BLOCK, w)
                yield (y0, y1, x0, x1, self._to_native(logits, (fh, fw), (h, w), (y0, y1), (x0, x1), (0, 0)))

    @staticmethod
    def _to_native(logits, scaled_shape, native_shape, rows, cols, origin) -> torch.Tensor:
        """Native block ``rows x cols`` of the logits, from a (C2, h, w) piece placed at ``origin``."""
        if tuple(scaled_shape) == tuple(native_shape):
            return logits[:, rows[0] - origin[0] : rows[1] - origin[0], cols[0] - origin[1] : cols[1] - origin[1]]
        j0, j1, wy = resample_weights(scaled_shape[0], native_shape[0], *rows)
        k0, k1, wx = resample_weights(scaled_shape[1], native_shape[1], *cols)
        oy, ox = origin
        if j0 < oy or k0 < ox or j1 - oy > logits.shape[1] or k1 - ox > logits.shape[2]:
            raise AssertionError("native block needs logits outside its tile; tile overlap too small")  # guarded in _crop_blocks
        return _resample(logits[:, j0 - oy : j1 - oy, k0 - ox : k1 - ox], wy, wx)

    # ------------------------------------------------------------------ public

    def predict_logits(self, image: Any, progress: Callable[[int, int], Any] | None = None, cancel: Any = None) -> np.ndarray:
        """(C2, H, W) float32 logits at native resolution, for images whose logits fit in memory.

        ``progress(done, total)`` is called after each model call; when ``cancel.is_set()``
        becomes true, :class:`Cancelled` is raised before the next one.
        """
        image = open_image(image)
        h, w = image.shape_yx
        out = np.empty((self.num_classes, h, w), np.float32)
        for y0, y1, x0, x1, block in self._blocks(image, progress, cancel):
            out[:, y0:y1, x0:x1] = block.cpu().numpy()
        return out

    def segment(
        self, image: Any, threshold: float = 0.5, progress: Callable[[int, int], Any] | None = None, cancel: Any = None
    ) -> np.ndarray:
        """Label image (H, W) at native resolution.

        One class: int32 instances (8-connected components of sigmoid > ``threshold``), ids
        1..N in raster order of their first pixel. Several classes: uint8, class channel c
        -> value c + 1, later classes overwrite earlier ones (disc ⊃ cup: 1 = rim, 2 = cup).
        Only the (H, W) result and one block of logits are held in memory.
        """
        image = open_image(image)
        return assemble_labels(image.shape_yx, self.num_classes, self.label_blocks(image, threshold, progress, cancel))

    def label_blocks(
        self, image: Any, threshold: float = 0.5, progress: Callable[[int, int], Any] | None = None, cancel: Any = None,
        within: Window | None = None,
    ) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        """Thresholded native blocks (y0, y1, x0, x1, block) for :func:`assemble_labels`.

        One class: bool foreground (h, w); several: uint8 classes (h, w), class channel c ->
        c + 1, later classes overwrite earlier ones. ``within``: as in ``_blocks``, only the
        model calls owned by that native window (a batch tile task).
        """
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
            raise InputError(f"threshold {threshold!r} must be a probability strictly between 0 and 1")
        if self.num_classes > 255:
            raise InputError(f"{self.source} has {self.num_classes} classes; class label images hold at most 255")
        image = open_image(image)
        cut = math.log(threshold / (1.0 - threshold))  # sigmoid(x) > t  <=>  x > logit(t)
        for y0, y1, x0, x1, block in self._blocks(image, progress, cancel, within):
            above = (block > cut).cpu().numpy()
            if self.num_classes == 1:
                yield y0, y1, x0, x1, above[0]
                continue
            classes = np.zeros(above.shape[1:], np.uint8)
            for c in range(self.num_classes):
                classes[above[c]] = c + 1
            yield y0, y1, x0, x1, classes

    def table(self, labels: np.ndarray) -> list[dict]:
        """Rows for the per-object (one class) or per-class (several) CSV: id/class and area."""
        counts = np.bincount(np.asarray(labels).ravel().astype(np.int64, copy=False))
        if self.num_classes == 1:
            return [{"id": i, "area": int(counts[i])} for i in range(1, len(counts)) if counts[i]]
        counts = np.pad(counts, (0, max(0, self.num_classes + 1 - len(counts))))
        return [{"class": c + 1, "name": self.class_names[c], "area": int(counts[c + 1])} for c in range(self.num_classes)]


__all__ = [
    "Cancelled",
    "InputGeometry",
    "assemble_labels",
    "PROMPT_FREE_ARCHITECTURE",
    "SemanticPredictor",
    "NotPromptFreeError",
    "read_model_checkpoint",
    "resample_weights",
    "tile_starts",
]
