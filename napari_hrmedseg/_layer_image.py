"""A 2D plane of a napari image layer's data, read crop by crop (lazy and multiscale data stay on disk)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class LayerImage:
    """One (H, W) or (H, W, C) plane of layer data, for the engine's ``read(y0, y1, x0, x1, level)``.

    Works with numpy, dask, zarr and tifffile-zarr arrays and with napari's multiscale lists
    (level 0 = full resolution). Only the requested crop is indexed, so a lazy array reads just
    those chunks. For nD data (..., Y, X[, C]) ``slice_index`` picks the leading indices at full
    resolution; coarser levels get them scaled.

    Attributes:
        shape_yx: (H, W) of level 0.
        levels: (H, W) of every level, finest first.
        channels: 1 for grey planes, C for RGB(A) / channel-last planes.
    """

    def __init__(self, data: Any, rgb: bool = False, slice_index: Sequence[int] = (), multiscale: bool | None = None) -> None:
        if multiscale is None:
            multiscale = isinstance(data, (list, tuple))
        self._arrays = list(data) if multiscale else [data]
        self.rgb = bool(rgb)
        spatial_end = -1 if self.rgb else None
        full = tuple(self._arrays[0].shape)
        self._lead_full = full[: len(full) - (3 if self.rgb else 2)]
        slice_index = tuple(int(i) for i in slice_index)
        if len(slice_index) != len(self._lead_full):
            raise ValueError(
                f"data of shape {full} needs {len(self._lead_full)} leading indices, got {slice_index}"
            )
        for axis, (i, n) in enumerate(zip(slice_index, self._lead_full)):
            if not 0 <= i < n:
                raise IndexError(f"slice index {i} is outside axis {axis} of size {n}")
        self.slice_index = slice_index
        self.levels = [tuple(int(s) for s in a.shape[len(self._lead_full) :][:spatial_end][-2:]) for a in self._arrays]
        self.shape_yx = self.levels[0]
        self.channels = int(full[-1]) if self.rgb else 1
        self.dtype = np.dtype(self._arrays[0].dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shape_yx + ((self.channels,) if self.rgb else ())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _lead_at(self, level: int) -> tuple[int, ...]:
        shape = self._arrays[level].shape
        return tuple(
            min(int(i * shape[a] / self._lead_full[a]), shape[a] - 1) for a, i in enumerate(self.slice_index)
        )

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """The crop [y0:y1, x0:x1] of ``level`` (coordinates of that level), as numpy."""
        h, w = self.levels[level]
        y0, y1 = max(0, int(y0)), min(h, int(y1))
        x0, x1 = max(0, int(x0)), min(w, int(x1))
        key = self._lead_at(level) + (slice(y0, y1), slice(x0, x1))
        return np.asarray(self._arrays[level][key])

    def __getitem__(self, key: Any) -> np.ndarray:
        """numpy-style access to level 0 (``image[y0:y1, x0:x1]``), for code that slices arrays."""
        if not isinstance(key, tuple):
            key = (key,)
        return np.asarray(self._arrays[0][self.slice_index + key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        # Reads the whole plane: only for small images (the engine reads crops).
        out = np.asarray(self._arrays[0][self.slice_index])
        return out.astype(dtype) if dtype is not None else out


def layer_plane(layer: Any, slice_index: Sequence[int]) -> LayerImage:
    """The plane of a napari Image layer at ``slice_index`` (leading data indices)."""
    return LayerImage(layer.data, rgb=bool(getattr(layer, "rgb", False)), slice_index=slice_index,
                      multiscale=bool(getattr(layer, "multiscale", False)))


def spatial_shape(layer: Any) -> tuple[int, ...]:
    """Label-image shape for an Image layer: its level-0 shape without the RGB axis."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(int(s) for s in data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape
