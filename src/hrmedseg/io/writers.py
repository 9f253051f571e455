"""Atomic writing of label images as tiled, compressed TIFF and of per-object tables."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..atomic import atomic_path
from ..errors import OutputError

TILE = 256
BIGTIFF_BYTES = 2**31


def label_dtype(max_id: int) -> np.dtype:
    """The smallest unsigned type napari and Fiji read that holds ``max_id``."""
    return np.dtype(np.uint16) if max_id < 2**16 else np.dtype(np.uint32)


def label_tiff_bytes(shape_yx: tuple[int, int], max_id: int, tile: int = TILE) -> int:
    """A label TIFF's size uncompressed (whole tiles): about the most it can take on disk."""
    nty, ntx = -(-int(shape_yx[0]) // tile), -(-int(shape_yx[1]) // tile)
    return nty * ntx * tile * tile * label_dtype(max_id).itemsize


def check_free_space(path: str | os.PathLike, needed: int, what: str = "the label image") -> None:
    """OutputError before the work when the disk holding ``path`` has less than ``needed`` bytes free."""
    import shutil

    target = Path(path)
    folder = next((p for p in (target.parent, *target.parent.parents) if p.exists()), Path.cwd())
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"not enough free space for {target}: {what} may need up to {needed / 2**20:.1f} MiB "
            f"(uncompressed), {folder} has {free / 2**20:.1f} MiB free; free some space or write elsewhere"
        )


def label_source(
    labels: Any, shape_yx: tuple[int, int] | None = None, max_id: int | None = None
) -> tuple[tuple[int, int], Callable[[int, int, int, int], np.ndarray], int]:
    """``(shape (H, W), read(y0, y1, x0, x1) -> (h, w) array, largest id)`` of a label image.

    ``labels``: an (H, W) array-like (numpy, zarr, memmap) or an object with ``shape_yx`` and
    ``read`` (``hrmedseg.engine.SparseLabels``), which is never rendered in full here.
    """
    if hasattr(labels, "read") and hasattr(labels, "shape_yx"):
        top = max_id if max_id is not None else int(getattr(labels, "max_id", 2**32 - 1))
        return tuple(labels.shape_yx), labels.read, top
    shape = tuple(labels.shape) if shape_yx is None else tuple(shape_yx)
    if len(shape) != 2:
        raise ValueError(f"labels must be 2D (H, W), got shape {shape}")
    read = lambda y0, y1, x0, x1: np.asarray(labels[y0:y1, x0:x1])  # noqa: E731
    top = max_id if max_id is not None else int(np.max(labels)) if np.prod(shape) else 0
    return shape, read, top


def _tiles(shape_yx: tuple[int, int], tile: int, read: Callable[[int, int, int, int], np.ndarray], dtype) -> Iterator[np.ndarray]:
    h, w = shape_yx
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            block = np.zeros((tile, tile), dtype)
            block[: y1 - y0, : x1 - x0] = read(y0, y1, x0, x1)
            yield block


def write_label_tiff(
    path: str | os.PathLike,
    labels: Any,
    shape_yx: tuple[int, int] | None = None,
    max_id: int | None = None,
    tile: int = TILE,
    compression: str = "zlib",
) -> Path:
    """Write a label image as a tiled, compressed TIFF, atomically.

    ``labels`` is an array-like of shape (H, W) (numpy, zarr, memmap), or an object with
    ``shape_yx`` and ``read(y0, y1, x0, x1)`` (e.g. ``hrmedseg.engine.SparseLabels``), which is
    rendered tile by tile so the full label image is never in memory.
    """
    import tifffile

    shape, read, top = label_source(labels, shape_yx, max_id)
    dtype = label_dtype(top)
    target = Path(path)
    with atomic_path(target) as tmp:
        tifffile.imwrite(
            tmp,
            _tiles(shape, tile, lambda *w: read(*w).astype(dtype, copy=False), dtype),
            shape=shape,
            dtype=dtype,
            tile=(tile, tile),
            compression=compression,
            bigtiff=shape[0] * shape[1] * dtype.itemsize > BIGTIFF_BYTES,
            photometric="minisblack",
            metadata=None,
        )
    return target


def write_label_stack_tiff(path: str | os.PathLike, labels: np.ndarray, tile: int = TILE, compression: str = "zlib") -> Path:
    """Write a (Z, H, W) label volume as a tiled, compressed multi-page TIFF (axes ZYX), atomically."""
    import tifffile

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"a label stack must be 3D (Z, H, W), got shape {labels.shape}")
    dtype = label_dtype(int(labels.max()) if labels.size else 0)
    target = Path(path)
    with atomic_path(target) as tmp:
        tifffile.imwrite(
            tmp, labels.astype(dtype, copy=False), tile=(tile, tile), compression=compression, photometric="minisblack",
            bigtiff=labels.size * dtype.itemsize > BIGTIFF_BYTES, metadata={"axes": "ZYX"},
        )
    return target


def write_object_table(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """CSV with one row per box: id, x0, y0, x1, y1 (clipped box), area, score, empty, note."""
    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "box_index", "x0", "y0", "x1", "y1", "area", "score", "empty", "note"])
            for r in records:
                x0, y0, x1, y1 = r.box
                writer.writerow(
                    [r.id, r.box_index, f"{x0:.2f}", f"{y0:.2f}", f"{x1:.2f}", f"{y1:.2f}", r.area, f"{r.score:.4f}", int(r.empty), r.note]
                )
    return target
