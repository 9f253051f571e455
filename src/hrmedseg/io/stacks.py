"""Stacks: images with a leading Z or T axis, read lazily one 2D slice at a time.

A :class:`LazyStack` knows its slice count and slice shape without reading pixels; ``slice(i)``
is an ordinary :class:`~hrmedseg.io.readers.LazyImage` of slice ``i`` (only the windows the
engine asks for are read), with a cache key of its own, so each slice's crop embeddings are
cached like any 2D image's.

Sources: a 3D (or 4D with channels) TIFF series (tifffile's zarr view: pages are decoded on
demand), an OME-Zarr whose axes name a z or t axis, a plain zarr array, or a numpy/dask/zarr
array whose first axis is the stack axis.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from .readers import ArrayImage, LazyImage, infer_axes

#: axis letters that may be a stack's axis (tifffile names an unknown axis Q, ImageJ series I)
STACK_AXES = "ZTQI"


class LazyStack:
    """A stack of 2D images along one axis; ``slice(i)`` is slice ``i`` as a LazyImage.

    Attributes: n_slices, shape_yx (H, W) of every slice, axis (the stack axis' letter),
    source_key (the stack's cache key; slices add their index), name (for messages).
    """

    def __init__(
        self,
        arrays: Sequence[Any],
        axes: str,
        *,
        name: str,
        source_key: str | None = None,
        channel: int | Sequence[int] | None = None,
    ) -> None:
        self.name = name
        self._arrays, self._axes, self._channel = list(arrays), axes.upper(), channel
        shape = tuple(int(n) for n in self._arrays[0].shape)
        if len(self._axes) != len(shape):
            raise InputError(f"axes {axes!r} do not fit {name} with shape {shape}")
        stack = [a for a, n in zip(self._axes, shape) if a in STACK_AXES and n > 1]
        if len(stack) > 1:
            raise InputError(f"{name} has axes {self._axes} with shape {shape}: more than one stack axis ({', '.join(stack)}); select one first")
        if not stack:
            raise InputError(f"{name} has axes {self._axes} with shape {shape}: no Z or T axis to propagate along (it is a 2D image)")
        self.axis = stack[0]
        self.n_slices = shape[self._axes.index(self.axis)]
        # one key for the whole stack (slices add their index), computed once, not per slice
        self.source_key = source_key or ArrayImage._default_key(self._arrays[0])
        self._first = self.slice(0)  # checks dtype, channels and the other axes once
        self.shape_yx = self._first.shape_yx
        self.dtype = self._first.dtype

    def slice(self, index: int) -> LazyImage:
        """Slice ``index`` (0 .. n_slices - 1) as a LazyImage; reading it reads only that slice."""
        if not 0 <= int(index) < self.n_slices:
            raise InputError(f"slice {index} is outside {self.name}, which has {self.n_slices} slices (0..{self.n_slices - 1})")
        return ArrayImage(
            self._arrays, channel=self._channel, axes=self._axes, name=f"{self.name} slice {int(index)}",
            source_key=self.source_key, plane={self.axis: int(index)},
        )

    def __len__(self) -> int:
        return self.n_slices

    def __repr__(self) -> str:
        return f"LazyStack({self.name}, {self.n_slices} x {self.shape_yx}, axis {self.axis})"


def _tiff_stack(path: Path, channel: Any, axes: str | None) -> LazyStack:
    import tifffile
    import zarr

    try:
        series = tifffile.TiffFile(path).series[0]  # kept open: the zarr views read from it
        arrays = [zarr.open(level.aszarr(), mode="r") for level in series.levels]
    except Exception as err:  # tifffile raises many types for broken files
        raise InputError(f"cannot read TIFF {path}: it is corrupt, truncated or not a TIFF ({type(err).__name__}: {str(err)[:200]})") from err
    st = path.stat()
    key = f"file:{path.resolve()}:{st.st_mtime_ns}:{st.st_size}"
    return LazyStack(arrays, axes or series.axes, name=str(path), source_key=key, channel=channel)


def open_stack(source: Any, channel: int | Sequence[int] | None = None, axes: str | None = None) -> LazyStack:
    """Wrap a stack file or array as a :class:`LazyStack` (no pixels are read here).

    ``source``: a TIFF path, an OME-Zarr/zarr path, a numpy/dask/zarr array (first axis: the
    stack, then (Y, X), (Y, X, C) or (C, Y, X)), or a LazyStack. ``axes``: letters naming every
    axis (e.g. "ZYX", "TCYX"), for arrays and files without axis metadata.
    """
    if isinstance(source, LazyStack):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"image file not found: {path}")
        if path.is_dir() or path.name.lower().endswith(".zarr"):
            from .ome_zarr import ome_zarr_arrays

            arrays, found, key = ome_zarr_arrays(path)
            found = axes or found or "Z" + infer_axes(tuple(arrays[0].shape[1:]), str(path))
            return LazyStack(arrays, found, name=str(path), source_key=key, channel=channel)
        if path.name.lower().endswith((".tif", ".tiff")):
            return _tiff_stack(path, channel, axes)
        raise InputError(f"{path}: a stack must be a TIFF or an OME-Zarr (PNG and JPEG hold one 2D image)")
    shape = tuple(getattr(source, "shape", ()))
    if len(shape) < 3:
        raise InputError(f"a stack needs a leading Z or T axis; got an array of shape {shape}")
    return LazyStack([source], axes or "Z" + infer_axes(shape[1:], "a stack's slice"), name=f"{type(source).__name__} stack", channel=channel)


__all__ = ["STACK_AXES", "LazyStack", "open_stack"]
