"""Our own weights file: tensors plus the metadata needed to rebuild and trust them.

A bundle is a ``torch.save``'d dict, loadable with ``weights_only=True``::

    {"format": "hrmedseg-bundle", "format_version": 1,
     "architecture": "lgvit_neck" | "hrmedseg" | "sam_prompt_decoder" | ...,
     "config": {...}, "preprocessing": {"pixel_mean": [...], "pixel_std": [...]},
     "provenance": {"source": ..., "source_sha256": ..., "licence": ..., ...},
     "state_dict": {name: tensor}}
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import WeightsError

BUNDLE_FORMAT = "hrmedseg-bundle"
BUNDLE_VERSION = 1


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` a file on the CPU, turning every failure into an error that names it.

    The only ``torch.load`` of weights files; :func:`hrmedseg.weights.checkpoint.read_checkpoint`
    is what callers use to learn what a file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        # mmap keeps a 2.5 GB SAM file out of memory until its tensors are touched.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            # torch's weights-only unpickler met a global it does not allow: code we never run.
            raise WeightsError(
                f"refused to load weights file {path}: it holds Python objects other than tensors and "
                f"plain data (a pickle that could run code), which hrmedseg never executes; "
                f"use weights saved as a state dict or an hrmedseg bundle"
            ) from err
        raise _unreadable(path, err) from err
    except Exception as err:  # noqa: BLE001 - torch's unpickler fails in many ways on a foreign file (e.g. KeyError)
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: BaseException) -> WeightsError:
    with open(path, "rb") as f:
        head = f.read(512)
    if head and all(b in b"\t\n\r" or 32 <= b < 127 for b in head):
        return WeightsError(f"cannot read weights file {path}: it is a text file, not a PyTorch checkpoint")
    detail = str(err).splitlines()[0][:200] if str(err) else ""
    return WeightsError(
        f"cannot read weights file {path} ({path.stat().st_size} bytes): it is corrupt, truncated "
        f"or not a PyTorch checkpoint ({type(err).__name__}: {detail})"
    )


def is_bundle(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT


def save_bundle(
    path: str | os.PathLike,
    architecture: str,
    state_dict: dict[str, torch.Tensor],
    config: dict | None = None,
    preprocessing: dict | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write a bundle atomically (an existing file is replaced only once the new one is complete)."""
    bundle = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "architecture": architecture,
        "config": config or {},
        "preprocessing": preprocessing or {},
        "provenance": provenance or {},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(bundle, tmp)
    return Path(path)


def check_architecture(source: str | os.PathLike, architecture: str, wanted: str | tuple[str, ...] | None) -> None:
    """Refuse weights of another architecture than ``wanted`` (None: any), naming ``source``."""
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    if wanted and architecture not in wanted:
        raise WeightsError(f"{source} holds weights for architecture '{architecture}', expected {' or '.join(wanted)}")


def load_bundle(path: str | os.PathLike, architecture: str | tuple[str, ...] | None = None) -> dict:
    """The raw dict of a bundle file; with ``architecture`` given, refuse a bundle of another kind.

    For what a file holds, whatever its format, use ``hrmedseg.weights.checkpoint.read_checkpoint``.
    """
    obj = load_file(path)
    if not is_bundle(obj):
        raise WeightsError(f"{path} is not an hrmedseg bundle (no 'format': '{BUNDLE_FORMAT}' entry)")
    check_architecture(path, obj["architecture"], architecture)
    return obj


def convert_bundle_dtype(src: str | os.PathLike, dest: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Re-save a bundle with its floating-point tensors in ``dtype`` (half the size for fp16).

    Models load such a file as usual: ``load_state_dict`` casts back to the model's own dtype.
    """
    bundle = load_bundle(src)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in bundle["state_dict"].items()}
    provenance = dict(bundle["provenance"], stored_dtype=str(dtype).removeprefix("torch."))
    return save_bundle(dest, bundle["architecture"], state, bundle["config"], bundle["preprocessing"], provenance)
