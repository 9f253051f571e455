"""A 2D plane of a napari image layer as an ``hrmedseg.io.LazyImage``, read crop by crop.

numpy, dask, zarr and tifffile-zarr arrays and napari's multiscale lists (level 0 = full
resolution) all work; only the windows the engine asks for are indexed, so lazy data reads just
the chunks (or tiles) under each box's crop.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hrmedseg.io import LazyImage
from hrmedseg.io.readers import check_dtype, object_token


class LayerImage(LazyImage):
    """One plane of layer data: (..., Y, X) grey or (..., Y, X, C) RGB(A).

    For nD data ``slice_index`` gives the leading indices at full resolution (the slice on
    screen); coarser pyramid levels get them scaled. Reads return (h, w, C) like every LazyImage.
    """

    def __init__(
        self,
        data: Any,
        rgb: bool = False,
        slice_index: Sequence[int] = (),
        multiscale: bool | None = None,
        name: str = "napari layer",
        channel: int | Sequence[int] | None = None,
    ) -> None:
        if multiscale is None:
            multiscale = isinstance(data, (list, tuple))
        self._arrays = list(data) if multiscale else [data]
        self.rgb = bool(rgb)
        self.name = name
        full = tuple(int(s) for s in self._arrays[0].shape)
        n_lead = len(full) - (3 if self.rgb else 2)
        if n_lead < 0:
            raise ValueError(f"{name}: data of shape {full} is not an image")
        self._lead_full = full[:n_lead]
        slice_index = tuple(int(i) for i in slice_index)
        if len(slice_index) != n_lead:
            raise ValueError(f"{name}: data of shape {full} needs {n_lead} leading indices, got {slice_index}")
        for axis, (i, n) in enumerate(zip(slice_index, self._lead_full)):
            if not 0 <= i < n:
                raise IndexError(f"{name}: slice index {i} is outside axis {axis} of size {n}")
        self.slice_index = slice_index
        self.dtype = check_dtype(self._arrays[0].dtype, name)
        self.levels = [tuple(int(s) for s in a.shape[n_lead : n_lead + 2]) for a in self._arrays]
        self.shape_yx = self.levels[0]
        self.n_source_channels = full[-1] if self.rgb else 1
        self.channels = self._select_channels(channel)
        # same array + same plane -> same key: the engine's embedding cache is reused across boxes
        self.source_key = f"napari:{object_token(self._arrays[0])}:{slice_index}"

    def _lead_at(self, level: int) -> tuple[int, ...]:
        shape = self._arrays[level].shape
        return tuple(min(int(i * shape[a] / self._lead_full[a]), shape[a] - 1) for a, i in enumerate(self.slice_index))

    def _read_raw(self, y0: int, y1: int, x0: int, x1: int, level: int) -> np.ndarray:
        window = self._arrays[level][self._lead_at(level) + (slice(y0, y1), slice(x0, x1))]
        if hasattr(window, "compute"):
            window = window.compute()
        window = np.asarray(window)
        if not self.rgb:
            window = window[..., None]
        return window[:, :, list(self.channels)]


def layer_plane(layer: Any, slice_index: Sequence[int]) -> LayerImage:
    """The plane of a napari Image layer at ``slice_index`` (leading data indices)."""
    return LayerImage(
        layer.data,
        rgb=bool(getattr(layer, "rgb", False)),
        slice_index=slice_index,
        multiscale=bool(getattr(layer, "multiscale", False)),
        name=f"layer '{layer.name}'",
    )


def spatial_shape(layer: Any) -> tuple[int, ...]:
    """Label-image shape for an Image layer: its level-0 shape without the RGB axis."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(int(s) for s in data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape
