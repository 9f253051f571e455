"""OME-Zarr (NGFF): writing label images chunk by chunk, and opening NGFF images lazily.

This module is the project's one home for NGFF. A label image is written as a multiscale
group (NGFF 0.5 on zarr v3 by default, 0.4 on zarr v2 with ``version="0.4"``) with
``image-label`` metadata, so ome-zarr-py and napari-ome-zarr open it as a labels layer::

    labels.ome.zarr/            multiscales (axes y, x) + image-label (optional colours)
        0/                      (H, W) full resolution, chunks of ``chunk`` x ``chunk``
        1/ 2/ ...               each level half the previous one (nearest neighbour: labels stay labels)

Only chunks holding a label are stored (absent chunks read as 0), chunks are written by a
thread pool, and the whole store appears at once (written beside the target, then renamed).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..atomic import atomic_dir
from ..errors import InputError
from .writers import label_dtype, label_source

NGFF_VERSIONS = ("0.4", "0.5")
CHUNK = 1024


def _chunk_windows(shape: tuple[int, int], chunk: int) -> Iterator[tuple[int, int, int, int]]:
    for y0 in range(0, shape[0], chunk):
        for x0 in range(0, shape[1], chunk):
            yield y0, min(y0 + chunk, shape[0]), x0, min(x0 + chunk, shape[1])


def _write_level(
    array: Any, read: Callable[[int, int, int, int], np.ndarray], pool: ThreadPoolExecutor, chunk: int,
    parents: set[tuple[int, int]] | None = None,
) -> set[tuple[int, int]]:
    """Fill ``array`` chunk by chunk from ``read``; returns the (row, col) of chunks holding labels.

    ``parents``: the non-empty chunks of the level above; a chunk none of whose four parent
    chunks holds a label is skipped without reading.
    """
    dtype = array.dtype

    def one(window: tuple[int, int, int, int]) -> tuple[int, int] | None:
        y0, y1, x0, x1 = window
        cy, cx = y0 // chunk, x0 // chunk
        if parents is not None and not any((2 * cy + i, 2 * cx + j) in parents for i in (0, 1) for j in (0, 1)):
            return None
        block = read(y0, y1, x0, x1)
        if not block.any():
            return None  # absent chunks read as the fill value, 0
        array[y0:y1, x0:x1] = block.astype(dtype, copy=False)
        return cy, cx

    return {c for c in pool.map(one, _chunk_windows(tuple(array.shape), chunk)) if c is not None}


def _pyramid_shapes(shape: tuple[int, int], chunk: int, levels: int | None) -> list[tuple[int, int]]:
    shapes = [shape]
    while (levels is None and max(shapes[-1]) > chunk) or (levels is not None and len(shapes) < levels):
        h, w = shapes[-1]
        if h == 1 and w == 1:
            break
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def ngff_format(version: str):
    """ome-zarr-py's format object of NGFF ``version`` ("0.5": zarr v3, "0.4": zarr v2); InputError otherwise."""
    from ome_zarr.format import FormatV04, FormatV05

    if version not in NGFF_VERSIONS:
        raise InputError(f"NGFF version {version!r} is not supported; use one of {NGFF_VERSIONS}")
    return FormatV05() if version == "0.5" else FormatV04()


def _colour_metadata(colors: Mapping[int, Sequence[int]] | None) -> list[dict] | None:
    if colors is None:
        return None
    out = []
    for value, rgba in sorted(colors.items()):
        rgba = [int(c) for c in rgba]
        if len(rgba) == 3:
            rgba.append(255)
        if len(rgba) != 4 or not all(0 <= c <= 255 for c in rgba):
            raise InputError(f"colour of label {value} must be 3 or 4 values 0..255 (RGB or RGBA), got {list(colors[value])}")
        out.append({"label-value": int(value), "rgba": rgba})
    return out


def _is_volume(labels: Any) -> bool:
    return not hasattr(labels, "shape_yx") and len(getattr(labels, "shape", ())) == 3


class _Plane:
    """Plane ``z`` of a (Z, H, W) zarr array, read and written like a 2D one (for the chunk writer)."""

    def __init__(self, array: Any, z: int) -> None:
        self.array, self.z, self.shape, self.dtype = array, z, tuple(array.shape[1:]), array.dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        return self.array[(self.z, *key)]

    def __setitem__(self, key: tuple, value: np.ndarray) -> None:
        self.array[(self.z, *key)] = value


def write_label_image(
    path: str | os.PathLike,
    labels: Any,
    *,
    max_id: int | None = None,
    colors: Mapping[int, Sequence[int]] | None = None,
    properties: Sequence[Mapping[str, Any]] | None = None,
    chunk: int = CHUNK,
    levels: int | None = None,
    version: str = "0.5",
    name: str = "labels",
    workers: int | None = None,
) -> Path:
    """Write a label image as an OME-Zarr (NGFF) multiscale labels image, atomically.

    Args:
        path: the store to write (a folder, conventionally ``*.ome.zarr``); replaced if it exists.
        labels: (H, W) integer labels: a numpy or zarr array, or an object with ``shape_yx`` and
            ``read(y0, y1, x0, x1)`` such as ``hrmedseg.engine.SparseLabels``, rendered one chunk
            at a time so the full image is never in memory; or a (Z, H, W) array (a stack:
            axes z, y, x, chunks of one plane, pyramid levels in y and x only).
        max_id: the largest label (chooses uint16 or uint32); default: from ``labels``.
        colors: optional {label value: (r, g, b[, a]) 0..255}, written as ``image-label.colors``.
        properties: optional ``image-label.properties``: one dict per label, each with its
            ``label-value`` (napari-ome-zarr shows them as the layer's features).
        chunk: chunk side in pixels (every level).
        levels: number of pyramid levels; default: halve until the image fits in one chunk.
        version: NGFF version, "0.5" (zarr v3) or "0.4" (zarr v2).
        name: the multiscale's name in the metadata.
        workers: threads writing chunks (default: the CPU count, at most 8).

    Returns the path written.
    """
    import zarr
    from ome_zarr.writer import add_metadata, write_multiscales_metadata

    fmt = ngff_format(version)
    # A (Z, H, W) volume (a propagated stack) is written plane by plane, with a z axis.
    planes = [labels[z] for z in range(labels.shape[0])] if _is_volume(labels) else [labels]
    if max_id is None and _is_volume(labels):
        max_id = int(np.max(labels)) if np.size(labels) else 0
    sources = [label_source(plane, max_id=max_id) for plane in planes]
    shape, top = sources[0][0], max(src[2] for src in sources)
    dtype = label_dtype(top)
    colour_list = _colour_metadata(colors)
    shapes = _pyramid_shapes(tuple(int(s) for s in shape), chunk, levels)
    lead, axes = ((len(planes),), ["z", "y", "x"]) if _is_volume(labels) else ((), ["y", "x"])
    target = Path(path)
    with atomic_dir(target) as tmp, ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=fmt.zarr_format)
        extra = {"dimension_names": axes} if fmt.zarr_format == 3 else {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
        previous: list[Any] = [None] * len(planes)
        written: list[Any] = [None] * len(planes)
        datasets = []
        for level, level_shape in enumerate(shapes):
            array = group.create_array(str(level), shape=lead + level_shape, chunks=(1,) * len(lead) + (min(chunk, level_shape[0]), min(chunk, level_shape[1])),
                                       dtype=dtype, fill_value=0, **extra)
            for z, (_, read, _) in enumerate(sources):
                target_plane = _Plane(array, z) if lead else array
                if previous[z] is None:
                    written[z] = _write_level(target_plane, read, pool, chunk)
                else:
                    src = previous[z]  # nearest neighbour: every second pixel of the level above
                    written[z] = _write_level(target_plane, lambda y0, y1, x0, x1, src=src: np.asarray(src[2 * y0 : 2 * y1 : 2, 2 * x0 : 2 * x1 : 2]),
                                              pool, chunk, parents=written[z])
                previous[z] = target_plane
            factor = float(2**level)
            datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(lead) + [factor, factor]}]})
        write_multiscales_metadata(group, datasets, fmt=fmt, axes=axes, name=name)
        image_label: dict[str, Any] = {"version": fmt.version}
        if colour_list is not None:
            image_label["colors"] = colour_list
        if properties is not None:
            image_label["properties"] = [dict(p) for p in properties]
        add_metadata(group, {"image-label": image_label}, fmt=fmt)
    return target


def _multiscales(attrs: Mapping[str, Any]) -> list | None:
    """The ``multiscales`` list of NGFF 0.4 (top-level attributes) or 0.5 (under ``ome``)."""
    return attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")


def ome_zarr_arrays(path: str | os.PathLike) -> tuple[list[Any], str | None, str]:
    """(arrays, axes letters or None, cache key) of an OME-Zarr image or a plain zarr array, lazily.

    A multiscale group gives its ``datasets`` (full resolution first) and the axes its metadata
    names; a bioformats2raw container its first image (``0/``); a plain zarr array itself and None.
    """
    import zarr

    path = Path(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:
        raise InputError(f"cannot open zarr store {path}: {type(err).__name__}: {str(err)[:200]}") from err
    st = path.stat()
    key = f"zarr:{path.resolve()}:{st.st_mtime_ns}"
    if isinstance(node, zarr.Array):
        return [node], None, key
    attrs = dict(node.attrs)
    ms = _multiscales(attrs)
    if not ms and "0" in node and isinstance(node["0"], zarr.Group) and _multiscales(dict(node["0"].attrs)):
        node = node["0"]  # bioformats2raw.layout: the first series
        ms = _multiscales(dict(node.attrs))
    if not ms:
        arrays = [k for k, _ in node.arrays()]
        raise InputError(f"{path} is a zarr group without OME-Zarr 'multiscales' metadata; open one of its arrays: {arrays[:5]}")
    m = ms[0]
    axes = "".join((a["name"] if isinstance(a, dict) else a)[0].upper() for a in m["axes"]) if "axes" in m else None
    return [node[d["path"]] for d in m["datasets"]], axes, key


def open_ome_zarr(path: str | os.PathLike, channel: int | Sequence[int] | None = None, axes: str | None = None):
    """Open an OME-Zarr (NGFF 0.4 or 0.5) image or a plain zarr array lazily, as a LazyImage.

    A multiscale group becomes a pyramid with the axes its metadata names (``axes`` overrides
    them; a plain zarr array is read with ``axes`` or inferred axes); see :func:`ome_zarr_arrays`.
    Only the chunks a window touches are read.
    """
    from .readers import ArrayImage

    arrays, found, key = ome_zarr_arrays(path)
    return ArrayImage(arrays, channel=channel, axes=axes or found, name=str(path), source_key=key)


__all__ = ["CHUNK", "NGFF_VERSIONS", "ngff_format", "ome_zarr_arrays", "open_ome_zarr", "write_label_image"]
