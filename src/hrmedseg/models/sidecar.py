"""Settings fitted for one weights file after its training: in the bundle's config, or in a JSON
beside the file (``model.pt`` -> ``model<suffix>``), so they can be added without rewriting the
weights. The prior gate (``.prior_gate.json``) and the click fix (``.click_fix.json``) live so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import WeightsError


def sidecar_path(weights_path: str | os.PathLike, suffix: str) -> Path:
    """``model.pt`` -> ``model<suffix>`` in the same folder."""
    path = Path(weights_path)
    return path.with_name(path.stem + suffix)


def find_sidecar(weights_path: str | os.PathLike | None, config: Mapping[str, Any], key: str, suffix: str) -> tuple[Mapping[str, Any], str] | None:
    """(record, where it came from): the bundle's ``config[key]``, else the JSON beside the weights
    file, else None. An unreadable JSON is a WeightsError naming the file."""
    if config.get(key) is not None:
        return config[key], f"{weights_path}: config[{key!r}]"
    path = None if weights_path is None else sidecar_path(weights_path, suffix)
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read it ({e})") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: a JSON object was expected, not {type(data).__name__}")
    return data, str(path)


__all__ = ["find_sidecar", "sidecar_path"]
