"""File hashes, read in chunks so that multi-GB checkpoints never sit in memory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike, progress: bool = True) -> str:
    """SHA-256 of a file, read in 4 MB chunks (a tqdm bar for files over 100 MB)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    bar = None
    if progress and size > 100_000_000:
        from tqdm.auto import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", leave=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return digest.hexdigest()
