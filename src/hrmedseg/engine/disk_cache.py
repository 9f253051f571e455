"""Crop embeddings kept on disk, so a reopened image (or a restarted napari) skips the encoder.

The second level behind the in-memory :class:`~hrmedseg.engine.cache.EmbeddingCache`:

    predictor = BoxPredictor(model, disk_cache=True)      # $HRMEDSEG_CACHE_DIR/embeddings or the user cache

Layout: one zarr group per entry, ``<root>/<digest[:2]>/<digest>.zarr``, ``digest`` the SHA-256 of
the entry's key. The key says where the embedding comes from: the image's identity (for files
their path, size and modification time; for in-memory arrays a hash of the crop's pixels, since
an array has no identity that survives the process), the crop (scale and window), the intensity
map, the model's weights digest and the backend. Each entry records its format, its key and a
CRC-32 per tensor: an entry of another format, or whose key differs (a foreign entry), or whose
bytes do not match (a corrupt one) is never used; it is recomputed and replaced. The key (compared
in full) says what the entry is; the CRC only has to catch damaged bytes, which a CRC-32 does
(every burst of up to 32 bits, anything else but for 1 in 2^32) at several GB/s, 3x faster than
the SHA-256 of format 1 (neither could stop a deliberate forgery written beside the data).

Safe against several processes: an entry is written into a temporary folder beside its place and
renamed there in one step (a reader sees the whole entry or none; when two processes write the
same entry, the first rename wins and the other's copy is dropped). Eviction and ``clear`` hold a
file lock (``filelock``) on ``<root>/.lock``. The bound is on the bytes of all entries; reads
touch an entry's modification time, and the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .decoder import Sam2Features

log = logging.getLogger(__name__)

#: 2: a CRC-32 per tensor (1: SHA-256; such entries are recomputed).
FORMAT = 2
DEFAULT_DISK_CACHE_BYTES = 4 * 2**30
#: "0" switches the default disk cache (``disk_cache=True``) off, e.g. for test runs.
DISK_CACHE_ENV = "HRMEDSEG_DISK_CACHE"
#: Source keys of images whose identity lasts beyond this process (``hrmedseg.io.readers``).
PERSISTENT_SOURCES = ("file:", "zarr:")


def default_root() -> Path:
    """``embeddings`` in the user cache (``$HRMEDSEG_CACHE_DIR`` or platformdirs), beside the weights."""
    from ..weights.cache import user_cache_root

    return user_cache_root() / "embeddings"


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_identity(source_key: str, pixels: torch.Tensor | None) -> str:
    """The part of a key that names the pixels: a persistent source key, else a hash of ``pixels``."""
    if source_key.startswith(PERSISTENT_SOURCES):
        return source_key
    if pixels is None:
        raise ValueError(f"an in-memory image ({source_key}) is keyed by its crop's pixels; pass them")
    return "pixels:" + hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _flatten(value: Any) -> tuple[str, list[torch.Tensor]]:
    if isinstance(value, Sam2Features):
        return "sam2", [value.image_embed, *value.high_res_feats]
    return "tensor", [value]


def _unflatten(kind: str, tensors: list[torch.Tensor]) -> Any:
    if kind == "sam2":
        return Sam2Features(tensors[0], tuple(tensors[1:]))
    return tensors[0]


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: keep its bits
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def _from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _checksum(a: np.ndarray) -> str:
    """CRC-32 of an array's bytes (C order), as 8 hex digits."""
    return f"{zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)):08x}"


#: The zarr v3 array metadata of what ``put`` writes: one chunk, raw little-endian bytes.
_ONE_RAW_CHUNK = {
    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
    "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
    "storage_transformers": [],
}


def _zarr_metadata(path: Path, node_type: str) -> dict | None:
    """A zarr v3 node's ``zarr.json``, or None where it is not one of ``node_type``."""
    meta = json.loads((path / "zarr.json").read_text())
    return meta if meta.get("zarr_format") == 3 and meta.get("node_type") == node_type else None


def _read_group_attrs(path: Path) -> dict:
    meta = _zarr_metadata(path, "group")
    if meta is None:
        import zarr

        return dict(zarr.open_group(str(path), mode="r").attrs)
    return dict(meta.get("attributes", {}))


def _raw_chunk(path: Path, meta: dict | None) -> Path | None:
    """The chunk file of a zarr v3 array that is one uncompressed little-endian chunk (what
    ``put`` writes), or None for any other array, or where zarr left the chunk out (fill values)."""
    shape = meta.get("shape") if meta else None
    if not (isinstance(shape, list) and shape and sys.byteorder == "little"):
        return None
    if any(meta.get(k) != v for k, v in _ONE_RAW_CHUNK.items()):
        return None
    if meta.get("chunk_grid") != {"name": "regular", "configuration": {"chunk_shape": shape}}:
        return None
    chunk = path.joinpath("c", *["0"] * len(shape))
    return chunk if chunk.is_file() else None


def _read_array(path: Path) -> np.ndarray:
    """A zarr array of an entry. What ``put`` writes is read straight from its chunk file: 1 ms for
    a 4 MiB embedding, where zarr's reader takes 5 ms, a sixth of a warm first box
    (docs/benchmarks.md). Anything else goes through zarr."""
    meta = _zarr_metadata(path, "array")
    chunk = _raw_chunk(path, meta)
    if chunk is None:
        import zarr

        return zarr.open_array(str(path), mode="r")[...]
    shape = meta["shape"]
    a = np.fromfile(chunk, dtype=np.dtype(meta["data_type"]))
    if a.size != math.prod(shape):
        raise ValueError(f"{path.name}: {a.size} values on disk, its shape {tuple(shape)} holds {math.prod(shape)}")
    return a.reshape(shape)


def _touch(path: Path) -> None:
    """Set an entry's modification time to now, to the nanosecond: the kernel's own stamps come
    from a clock that moves a few ms at a time, too coarse to order a write and a read that follow
    each other (LRU order)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass  # removed meanwhile


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class DiskEmbeddingCache:
    """Embeddings in zarr entries under ``root``, at most ``max_bytes`` in all (LRU eviction).

    ``get``/``put`` take the engine's value (a tensor or :class:`Sam2Features`, with the pyramid
    level read) and a key tuple of strings and numbers. ``hits``, ``misses``, ``rejected``
    (corrupt or foreign entries seen) and ``evictions`` count what happened.
    """

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int = DEFAULT_DISK_CACHE_BYTES) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.rejected = self.evictions = 0

    # -- paths ----------------------------------------------------------------------------
    @staticmethod
    def digest(key: tuple) -> str:
        return hashlib.sha256(repr(key).encode()).hexdigest()

    def path(self, key: tuple) -> Path:
        d = self.digest(key)
        return self.root / d[:2] / f"{d}.zarr"

    def entries(self) -> list[Path]:
        return sorted(self.root.glob("??/*.zarr")) if self.root.is_dir() else []

    def _lock(self):
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"))

    # -- read / write ---------------------------------------------------------------------
    def get(self, key: tuple, device: torch.device | str = "cpu") -> tuple[Any, int] | None:
        """(value on ``device``, level), or None when absent, foreign or corrupt (then removed)."""
        path = self.path(key)
        if not path.is_dir():
            self.misses += 1
            return None
        try:
            value = self._read(path, key)
        except Exception as err:  # a corrupt or foreign entry is recomputed, never trusted
            log.warning("embedding cache: ignoring entry %s (%s)", path.name, err)
            self.rejected += 1
            self.misses += 1
            self._remove(path)
            return None
        _touch(path)  # recently used
        self.hits += 1
        kind, tensors, level = value
        return _unflatten(kind, [t.to(device) for t in tensors]), level

    def _read(self, path: Path, key: tuple) -> tuple[str, list[torch.Tensor], int]:
        attrs = _read_group_attrs(path)
        if attrs.get("format") != FORMAT:
            raise ValueError(f"written in format {attrs.get('format')}, not {FORMAT}")
        if attrs.get("key") != repr(key):
            raise ValueError("written for another key (foreign entry)")
        tensors = []
        for i, (dtype, checksum) in enumerate(zip(attrs["dtypes"], attrs["checksums"])):
            a = _read_array(path / f"t{i}")
            if _checksum(a) != checksum:
                raise ValueError(f"tensor {i} does not match its checksum (corrupt entry)")
            tensors.append(_from_numpy(a, dtype))
        if len(tensors) != len(attrs["dtypes"]) or not tensors:
            raise ValueError("incomplete entry")
        return str(attrs["kind"]), tensors, int(attrs["level"])

    def put(self, key: tuple, value: Any, level: int = 0) -> None:
        """Write an entry (temporary folder, then one rename), then evict down to the bound."""
        import zarr

        kind, tensors = _flatten(value)
        arrays = [_to_numpy(t) for t in tensors]
        size = sum(a.nbytes for a, _ in arrays)
        if size > self.max_bytes:
            return
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            group = zarr.open_group(str(tmp), mode="w")
            for i, (a, _) in enumerate(arrays):
                group.create_array(f"t{i}", data=a, chunks=a.shape, compressors=None)
            group.attrs.update(
                format=FORMAT, key=repr(key), kind=kind, level=int(level),
                dtypes=[d for _, d in arrays], checksums=[_checksum(a) for a, _ in arrays],
            )
            if path.exists():  # a foreign or stale entry under the same name: replace it
                self._remove(path)
            try:
                os.rename(tmp, path)
                _touch(path)
            except OSError:  # another process renamed the same entry in first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.evict()

    def _remove(self, path: Path) -> None:
        """Rename away, then delete: readers never see a half-deleted entry under its name."""
        trash = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.del")
        try:
            os.rename(path, trash)
        except OSError:
            return  # already gone
        shutil.rmtree(trash, ignore_errors=True)

    # -- bound ----------------------------------------------------------------------------
    def info(self) -> dict:
        """{root, entries, bytes, max_bytes}."""
        entries = self.entries()
        return {"root": str(self.root), "entries": len(entries), "bytes": sum(_folder_bytes(p) for p in entries), "max_bytes": self.max_bytes}

    def evict(self) -> int:
        """Remove least recently used entries until all fit in ``max_bytes``; returns how many went."""
        with self._lock():
            sized = []
            for p in self.entries():
                try:
                    sized.append((p.stat().st_mtime_ns, _folder_bytes(p), p))
                except OSError:
                    continue  # removed meanwhile
            total = sum(s for _, s, _ in sized)
            removed = 0
            for _, s, p in sorted(sized, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                self._remove(p)
                total -= s
                removed += 1
        self.evictions += removed
        return removed

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        with self._lock():
            entries = self.entries()
            for p in entries:
                self._remove(p)
        return len(entries)


def resolve_disk_cache(disk_cache: Any) -> DiskEmbeddingCache | None:
    """None/False: off; True: the default root (off when ``$HRMEDSEG_DISK_CACHE`` is "0"); a path:
    that root; a :class:`DiskEmbeddingCache` as is."""
    if disk_cache is None or disk_cache is False or (disk_cache is True and os.environ.get(DISK_CACHE_ENV) == "0"):
        return None
    if disk_cache is True:
        return DiskEmbeddingCache()
    if isinstance(disk_cache, DiskEmbeddingCache):
        return disk_cache
    return DiskEmbeddingCache(disk_cache)


__all__ = ["DEFAULT_DISK_CACHE_BYTES", "DiskEmbeddingCache", "default_root", "image_identity", "model_digest", "resolve_disk_cache"]
