"""Lazy, region-wise reading of images of any size.

Every reader is a :class:`LazyImage`: it knows the image's shape, dtype, channels and pyramid
levels without reading pixels, and ``read(y0, y1, x0, x1, level)`` returns only the requested
window as a ``(h, w, C)`` array. Tiled TIFF / OME-TIFF files decode only the tiles (or strips)
that a window touches; zarr / OME-Zarr and dask arrays load only the chunks they touch;
PNG and JPEG (which cannot be read partially) are decoded once, on first use.

Axes: 2D ``(Y, X)`` is grey; 3D ``(Y, X, 3|4)`` is RGB(A); 3D ``(C, Y, X)`` is channels-first
multichannel. Leading axes of size 1 are dropped. Anything else needs an explicit ``axes``.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from itertools import count
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

SUPPORTED_KINDS = "uint8, uint16 (any unsigned/signed integer) or float"

_token_counter = count(1)
_tokens: dict[int, tuple[weakref.ref, str]] = {}
_tokens_lock = threading.Lock()


def object_token(obj: Any) -> str:
    """A key that is the same for the same live object and never reused for another one.

    ``id()`` alone can be reused after an object dies; the weak reference check prevents a
    stale embedding cache hit on a new array that happens to get the same id.
    """
    with _tokens_lock:
        entry = _tokens.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        token = f"obj{next(_token_counter)}"
        try:
            ref = weakref.ref(obj, lambda _r, key=id(obj): _tokens.pop(key, None))
        except TypeError:  # objects without weakref support: keep them alive instead
            ref = (lambda o: (lambda: o))(obj)
        _tokens[id(obj)] = (ref, token)
        return token


def check_dtype(dtype: np.dtype, what: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise InputError(f"{what} has pixel type {dtype}, which is not supported; use {SUPPORTED_KINDS}")
    return dtype


class LazyImage:
    """Base of all readers. Subclasses implement ``_read_raw`` for one level.

    Attributes:
        shape_yx: (H, W) at full resolution (level 0).
        levels: [(H_l, W_l), ...] for each pyramid level, level 0 first.
        dtype: the pixel type.
        channels: indices of the source channels returned by ``read`` (in order).
        n_source_channels: how many channels the source has.
        source_key: a string that identifies the pixels (cache key); see ``object_token``.
        name: for messages.
    """

    shape_yx: tuple[int, int]
    levels: list[tuple[int, int]]
    dtype: np.dtype
    n_source_channels: int
    channels: tuple[int, ...]
    source_key: str
    name: str

    def _select_channels(self, channel: int | Sequence[int] | None) -> tuple[int, ...]:
        n = self.n_source_channels
        if channel is None:
            if n in (1, 3):
                return tuple(range(n))
            if n == 4 and self.dtype == np.uint8:
                return (0, 1, 2)  # RGBA: drop alpha
            raise InputError(
                f"{self.name} has {n} channels; choose up to 3 of them (channel=, or --channel), e.g. channel=0"
            )
        chosen = (channel,) if isinstance(channel, (int, np.integer)) else tuple(channel)
        if not 1 <= len(chosen) <= 3:
            raise InputError(f"channel selection {channel!r} for {self.name}: give 1 to 3 channel indices")
        for c in chosen:
            if not isinstance(c, (int, np.integer)) or not 0 <= int(c) < n:
                raise InputError(f"channel {c!r} does not exist in {self.name}, which has {n} channel(s) (0..{n - 1})")
        return tuple(int(c) for c in chosen)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    def level_downsample(self, level: int) -> tuple[float, float]:
        """Native pixels per level pixel along (y, x)."""
        h, w = self.levels[level]
        return self.shape_yx[0] / h, self.shape_yx[1] / w

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """The window ``[y0:y1, x0:x1]`` of ``level`` as ``(h, w, C)``; must lie inside the level."""
        if not 0 <= level < len(self.levels):
            raise InputError(f"{self.name} has no pyramid level {level} (it has {len(self.levels)})")
        h, w = self.levels[level]
        y0, y1, x0, x1 = int(y0), int(y1), int(x0), int(x1)
        if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
            raise ValueError(f"window y {y0}:{y1}, x {x0}:{x1} is outside level {level} of {self.name} ({h} x {w})")
        try:
            out = self._read_raw(y0, y1, x0, x1, level)
        except InputError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, IndexError, EOFError) as err:
            raise InputError(
                f"cannot read pixels y {y0}:{y1}, x {x0}:{x1} of {self.name}: the file is corrupt or truncated "
                f"({type(err).__name__}: {str(err)[:200]})"
            ) from err
        return out

    def _read_raw(self, y0: int, y1: int, x0: int, x1: int, level: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, shape_yx={self.shape_yx}, dtype={self.dtype}, levels={len(self.levels)}, channels={self.channels})"


def infer_axes(shape: tuple[int, ...], what: str) -> str:
    """Axes letters ('YX', 'YXC' or 'CYX') for an array without metadata; leading size-1 axes -> 'Q'."""
    lead = 0
    while len(shape) - lead > 3 and shape[lead] == 1:
        lead += 1
    core = shape[lead:]
    if len(core) == 2:
        axes = "YX"
    elif len(core) == 3:
        if core[-1] in (3, 4) and core[0] > 4:
            axes = "YXC"
        elif core[0] <= 16 and core[-1] > 16:
            axes = "CYX"
        elif core[-1] <= 4 and core[0] > 16:
            axes = "YXC"
        else:
            raise InputError(f"cannot tell the axes of {what} with shape {shape}; pass axes='YXC' or axes='CYX'")
    else:
        raise InputError(
            f"{what} has shape {shape}: {len(shape)} dimensions are not supported; give a 2D image "
            f"(Y, X), RGB (Y, X, 3) or channels-first (C, Y, X), e.g. select one plane or time point first"
        )
    return "Q" * lead + axes


class ArrayImage(LazyImage):
    """numpy, dask, zarr or any sliceable array (or a list of them: a pyramid, level 0 first)."""

    def __init__(
        self,
        data: Any,
        channel: int | Sequence[int] | None = None,
        axes: str | None = None,
        name: str | None = None,
        source_key: str | None = None,
        plane: dict[str, int] | None = None,
    ) -> None:
        arrays = list(data) if isinstance(data, (list, tuple)) else [data]
        # plane: fixed indices of non-spatial axes (a slice of a Z/T stack: hrmedseg.io.stacks)
        self._plane = {k.upper(): int(v) for k, v in (plane or {}).items()}
        self.name = name or f"{type(arrays[0]).__name__} image"
        for a in arrays:
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise InputError(f"{self.name}: {type(a).__name__} is not an array (no shape/dtype)")
        self.dtype = check_dtype(arrays[0].dtype, self.name)
        axes = (axes or infer_axes(tuple(arrays[0].shape), self.name)).upper()
        if len(axes) != len(arrays[0].shape) or "Y" not in axes or "X" not in axes:
            raise InputError(f"axes {axes!r} do not fit {self.name} with shape {tuple(arrays[0].shape)}")
        extra = [(a, n) for a, n in zip(axes, arrays[0].shape) if a not in "YXCS" and n != 1 and a not in self._plane]
        if extra:
            raise InputError(
                f"{self.name} has axes {axes} with shape {tuple(arrays[0].shape)}: axis {extra[0][0]} has size "
                f"{extra[0][1]}; select one plane first"
            )
        self._axes = axes
        self._arrays = arrays
        self.levels = [(int(a.shape[axes.index("Y")]), int(a.shape[axes.index("X")])) for a in arrays]
        self.shape_yx = self.levels[0]
        caxis = "C" if "C" in axes else ("S" if "S" in axes else None)
        self._caxis = caxis
        self.n_source_channels = int(arrays[0].shape[axes.index(caxis)]) if caxis else 1
        self.channels = self._select_channels(channel)
        self.source_key = source_key or self._default_key(arrays[0])
        if self._plane:  # each slice is its own image to the embedding cache
            self.source_key += ":" + ",".join(f"{a}{i}" for a, i in sorted(self._plane.items()))

    @staticmethod
    def _default_key(arr: Any) -> str:
        name = getattr(arr, "name", None)
        if type(arr).__module__.startswith("dask") and isinstance(name, str):
            return f"dask:{name}"  # dask names are content tokens of the graph
        return object_token(arr)

    def _read_raw(self, y0: int, y1: int, x0: int, x1: int, level: int) -> np.ndarray:
        arr = self._arrays[level]
        index: list[Any] = []
        for axis, a in enumerate(self._axes):
            if a == "Y":
                index.append(slice(y0, y1))
            elif a == "X":
                index.append(slice(x0, x1))
            elif a == self._caxis:
                index.append(slice(None))
            elif a in self._plane:  # pyramids may shrink Z too: the same relative position
                full, here = self._arrays[0].shape[axis], arr.shape[axis]
                index.append(min(self._plane[a] * here // full, here - 1))
            else:
                index.append(0)
        window = arr[tuple(index)]
        if hasattr(window, "compute"):
            window = window.compute()
        window = np.asarray(window)
        kept = [a for a in self._axes if a in ("Y", "X", self._caxis)]
        if self._caxis is None:
            window = window[..., None]
            kept.append("C")
            cax = "C"
        else:
            cax = self._caxis
        window = np.moveaxis(window, [kept.index("Y"), kept.index("X"), kept.index(cax)], [0, 1, 2])
        return window[:, :, list(self.channels)]


TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs", ".ndpi", ".qptiff")


def decode_with_pillow(path: Path) -> np.ndarray:
    """A PNG / JPEG (any format Pillow reads) decoded in full: (H, W) grey or (H, W, 3|4) RGB(A).

    Palette images become RGB(A), grey + alpha becomes grey, CMYK becomes RGB, and Pillow's
    int32 'I' mode of 16-bit PNGs becomes uint16. Errors are :class:`InputError` naming the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # detects truncation and corruption cheaply
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 2**31)
        with Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("LA",):
                im = im.convert("L")
            elif im.mode == "CMYK":
                im = im.convert("RGB")
            data = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"cannot read image {path}: it is corrupt, truncated or not an image ({err})") from err
    if data.dtype == np.int32 and data.size and data.min() >= 0 and data.max() < 65536:
        data = data.astype(np.uint16)  # Pillow's 'I' mode for 16-bit PNGs
    return data


class DecodedFileImage(ArrayImage):
    """PNG / JPEG (and other formats Pillow reads): decoded in full on first use."""

    def __init__(self, path: Path, channel: int | Sequence[int] | None = None) -> None:
        self.path = path
        data = decode_with_pillow(path)
        st = path.stat()
        super().__init__(data, channel=channel, name=str(path), source_key=f"file:{path.resolve()}:{st.st_mtime_ns}:{st.st_size}")


def check_tiff_extents(path: Path, pages: Sequence[Any]) -> None:
    """InputError when a page's tiles or strips reach past the end of the file (a truncated TIFF).

    Reads only the pages' offset and byte-count tags, so a broken file fails when it is opened,
    before any model work. Offset or byte count 0 is a tile the writer left empty, not an error.
    """
    size = path.stat().st_size
    for page in pages:
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        ends = np.where((offsets > 0) & (counts > 0), offsets + counts, 0)
        if ends.size and int(ends.max()) > size:
            i = int(ends.argmax())
            raise InputError(
                f"TIFF {path} is truncated: page {page.index} needs bytes up to {int(ends[i])} "
                f"(tile/strip {i + 1} of {ends.size}), but the file has {size} bytes; copy it again"
            )


class TiffImage(LazyImage):
    """TIFF / OME-TIFF via tifffile, decoding only the tiles or strips a window touches.

    Pyramids (OME-TIFF SubIFDs, series levels) become ``levels``. Channels can be samples of a
    page (RGB, contiguous or planar) or separate pages (OME-TIFF ``CYX``). ``tiles_decoded`` counts
    decoded tiles/strips (cache misses), which tests use to prove that reads stay local.
    """

    def __init__(
        self, path: Path, channel: int | Sequence[int] | None = None, series: int = 0, tile_cache_bytes: int = 64 * 2**20
    ) -> None:
        import tifffile

        self.path = path
        self.name = str(path)
        try:
            self._tif = tifffile.TiffFile(path)
            s = self._tif.series[series]
            levels = list(s.levels)
            axes, shape = s.axes.upper(), tuple(s.shape)
            # TiffFrames (light IFD views) lack tile geometry: use full pages
            level_pages = [[p if isinstance(p, tifffile.TiffPage) else p.aspage() for p in lv.pages] for lv in levels]
            keyframes = [lv.keyframe for lv in levels]
            check_tiff_extents(path, [page for pages in level_pages for page in pages])
        except InputError:
            raise
        except Exception as err:  # tifffile raises many types for broken files
            raise InputError(f"cannot read TIFF {path}: it is corrupt, truncated or not a TIFF ({type(err).__name__}: {str(err)[:200]})") from err
        self.dtype = check_dtype(keyframes[0].dtype, self.name)
        page_axes = [(a, n) for a, n in zip(axes, shape) if a not in "YXS" and n != 1]
        if len(page_axes) > 1 or (page_axes and page_axes[0][0] != "C"):
            raise InputError(
                f"{path} has axes {axes} with shape {shape}: only Y, X and channels (C/S) are supported; "
                f"axis {page_axes[0][0]} has size {page_axes[0][1]}"
            )
        self._channels_in_pages = bool(page_axes)
        self.n_source_channels = page_axes[0][1] if page_axes else int(keyframes[0].samplesperpixel)
        self._level_pages = level_pages
        self.levels = [(int(k.imagelength), int(k.imagewidth)) for k in keyframes]
        self.shape_yx = self.levels[0]
        self.channels = self._select_channels(channel)
        st = path.stat()
        self.source_key = f"file:{path.resolve()}:{st.st_mtime_ns}:{st.st_size}:s{series}"
        self.tiles_decoded = 0
        self._memmaps: dict[int, np.ndarray] = {}
        self._tile_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._tile_cache_bytes = 0
        self._tile_cache_max = tile_cache_bytes
        self._lock = threading.RLock()

    def close(self) -> None:
        self._tif.close()

    def _page_region(self, page: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(h, w, S) window of one page, all samples."""
        spp = int(page.samplesperpixel)
        if page.is_contiguous and page.compression == 1 and not page.is_tiled:
            mm = self._memmaps.get(id(page))
            if mm is None:
                offset = page.dataoffsets[0]
                shaped = page.shaped  # (planes, depth, h, w, samples)
                mm = np.memmap(self.path, dtype=page.dtype.newbyteorder(self._tif.byteorder), mode="r", offset=offset, shape=shaped)
                self._memmaps[id(page)] = mm
            win = mm[:, 0, y0:y1, x0:x1, :]
            return np.ascontiguousarray(np.moveaxis(win, 0, -1).reshape(y1 - y0, x1 - x0, -1)).astype(page.dtype, copy=False)
        h, w = int(page.imagelength), int(page.imagewidth)
        planes = spp if page.planarconfig == 2 else 1
        if page.is_tiled:
            th, tw = int(page.tilelength), int(page.tilewidth)
        else:
            th, tw = int(page.rowsperstrip) or h, w
            th = min(th, h)
        ny, nx = -(-h // th), -(-w // tw)
        wanted = [
            p * ny * nx + ty * nx + tx
            for p in range(planes)
            for ty in range(y0 // th, -(-y1 // th))
            for tx in range(x0 // tw, -(-x1 // tw))
        ]
        out = np.zeros((y1 - y0, x1 - x0, spp), page.dtype)
        missing = []
        for idx in wanted:
            cached = self._tile_cache.get((id(page), idx))
            if cached is None:
                missing.append(idx)
            else:
                self._tile_cache.move_to_end((id(page), idx))
                self._place(out, cached, idx, page, ny, nx, th, tw, y0, x0)
        if missing:
            offsets = [page.dataoffsets[i] for i in missing]
            counts = [page.databytecounts[i] for i in missing]
            for data, idx in self._tif.filehandle.read_segments(offsets, counts, indices=missing, lock=self._lock):
                if data is None or len(data) == 0:
                    raise OSError(f"tile {idx} is missing (truncated file)")
                tile, _, _ = page.decode(data, idx, jpegtables=page.jpegtables)
                if tile is None:
                    raise OSError(f"tile {idx} cannot be decoded")
                self.tiles_decoded += 1
                tile = np.asarray(tile)
                self._remember((id(page), idx), tile)
                self._place(out, tile, idx, page, ny, nx, th, tw, y0, x0)
        return out

    def _remember(self, key: tuple, tile: np.ndarray) -> None:
        self._tile_cache[key] = tile
        self._tile_cache_bytes += tile.nbytes
        while self._tile_cache_bytes > self._tile_cache_max and self._tile_cache:
            _, old = self._tile_cache.popitem(last=False)
            self._tile_cache_bytes -= old.nbytes

    @staticmethod
    def _place(out, tile, idx, page, ny, nx, th, tw, y0, x0) -> None:
        plane, rest = divmod(idx, ny * nx)
        ty, tx = divmod(rest, nx)
        tile = tile.reshape(tile.shape[-3], tile.shape[-2], tile.shape[-1])  # (th, tw, samples in tile)
        ty0, tx0 = ty * th, tx * tw
        h, w = out.shape[:2]
        ys, ye = max(ty0, y0), min(ty0 + tile.shape[0], y0 + h)
        xs, xe = max(tx0, x0), min(tx0 + tile.shape[1], x0 + w)
        if ys >= ye or xs >= xe:
            return
        src = tile[ys - ty0 : ye - ty0, xs - tx0 : xe - tx0]
        if page.planarconfig == 2:
            out[ys - y0 : ye - y0, xs - x0 : xe - x0, plane] = src[..., 0]
        else:
            out[ys - y0 : ye - y0, xs - x0 : xe - x0, :] = src

    def _read_raw(self, y0: int, y1: int, x0: int, x1: int, level: int) -> np.ndarray:
        pages = self._level_pages[level]
        with self._lock:
            if self._channels_in_pages:
                return np.stack([self._page_region(pages[c], y0, y1, x0, x1)[..., 0] for c in self.channels], axis=-1)
            return self._page_region(pages[0], y0, y1, x0, x1)[:, :, list(self.channels)]


def image_shape_yx(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file from its header: Pillow formats are not decoded (``open_image``
    decodes them in full), others are opened lazily. Errors are :class:`InputError` naming the file."""
    path = Path(path)
    if path.is_file() and not path.name.lower().endswith(TIFF_SUFFIXES):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                return im.size[1], im.size[0]
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            raise InputError(f"cannot read image {path}: it is corrupt, truncated or not an image ({err})") from err
    return open_image(path).shape_yx


def open_image(
    source: Any, channel: int | Sequence[int] | None = None, axes: str | None = None, series: int = 0
) -> LazyImage:
    """Wrap a file path or an array as a :class:`LazyImage` (no pixels are read here).

    ``source``: a path (.tif/.tiff/.ome.tif, .zarr/.ome.zarr, .png, .jpg/.jpeg, others Pillow reads),
    a numpy/dask/zarr array, a list of arrays (a pyramid, full resolution first) or a LazyImage.
    ``channel``: None (grey, RGB, or RGBA without alpha), one index, or up to 3 indices.
    """
    if isinstance(source, LazyImage):
        if channel is not None and tuple(np.atleast_1d(channel)) != source.channels:
            raise InputError(f"{source.name} is already open with channels {source.channels}")
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"image file not found: {path}")
        suffix = path.name.lower()
        if path.is_dir() or suffix.endswith(".zarr"):
            from .ome_zarr import open_ome_zarr

            return open_ome_zarr(path, channel, axes)
        if suffix.endswith(TIFF_SUFFIXES):
            return TiffImage(path, channel=channel, series=series)
        return DecodedFileImage(path, channel=channel)
    return ArrayImage(source, channel=channel, axes=axes)
