"""Click prompts: reading point files (object id, x, y, label).

A point file lists clicks, one a row: the object it belongs to (the object's id, ``i + 1`` for
the i-th box of a box file, as in the label image), its ``x, y`` in full-resolution image pixels
(continuous coordinates, as boxes), and its label: 1 (or ``positive``, ``+``) for "this is the
object", 0 (or ``negative``, ``-``) for "this is not" (default 1). Ids beyond the boxes start
objects prompted by clicks alone.

Formats (by content, as box files):
- CSV with a header naming ``object`` (or ``id``, ``object_id``), ``x``, ``y`` and optionally
  ``label``; other columns are ignored. Errors name the file's row (1-based; the header is row 1).
- JSON: a list of ``{"object": 1, "x": 10.5, "y": 20, "label": 1}`` objects or of
  ``[object, x, y(, label)]`` lists, or ``{"points": [...]}``. Errors name the entry (1-based).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .boxes import json_list, parse_json

ID_ALIASES = ("object", "id", "object_id")
LABEL_WORDS = {"1": 1, "0": 0, "positive": 1, "negative": 0, "pos": 1, "neg": 0, "+": 1, "-": 0, "true": 1, "false": 0}

# object id -> ((P, 2) float64 xy, (P,) int64 labels), ids ascending
PointPrompts = dict[int, tuple[np.ndarray, np.ndarray]]


def _row_values(obj: Any, x: Any, y: Any, label: Any, where: str) -> tuple[int, float, float, int]:
    try:
        oid_f, xf, yf = float(obj), float(x), float(y)
    except (TypeError, ValueError):
        raise InputError(f"{where}: object id, x and y must be numbers; got {obj!r}, {x!r}, {y!r}") from None
    if not oid_f.is_integer() or oid_f < 1:
        raise InputError(f"{where}: object id {obj!r} is not a whole number >= 1")
    if not (math.isfinite(xf) and math.isfinite(yf)):
        raise InputError(f"{where}: x, y ({x!r}, {y!r}) hold NaN or infinity")
    word = "1" if label is None or str(label).strip() == "" else str(label).strip().lower()
    if word.endswith(".0"):
        word = word[:-2]
    if word not in LABEL_WORDS:
        raise InputError(f"{where}: label {label!r} is neither 1 (positive) nor 0 (negative)")
    return int(oid_f), xf, yf, LABEL_WORDS[word]


def _read_csv(text: str, name: str) -> list[tuple[int, float, float, int]]:
    rows = [(n, r) for n, r in enumerate(csv.reader(io.StringIO(text)), start=1) if r and any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"point file {name} has no rows")
    header = [c.strip().lower() for c in rows[0][1]]
    id_col = next((header.index(a) for a in ID_ALIASES if a in header), None)
    if id_col is None or "x" not in header or "y" not in header:
        raise InputError(f"row {rows[0][0]} of {name}: columns {rows[0][1]} do not name object, x, y (and label)")
    cols = [id_col, header.index("x"), header.index("y")]
    label_col = header.index("label") if "label" in header else None
    out = []
    for n, row in rows[1:]:
        where = f"row {n} of {name}"
        if len(row) <= max(cols + [label_col or 0]):
            raise InputError(f"{where}: expected {len(header)} values ({', '.join(header)}), found {len(row)}: {row}")
        label = None if label_col is None else row[label_col]
        out.append(_row_values(*(row[c].strip() for c in cols), label, where))
    return out


def _read_json(text: str, name: str) -> list[tuple[int, float, float, int]]:
    obj = json_list(parse_json(text, name, "point"), name, "points")
    out = []
    for n, p in enumerate(obj, start=1):
        where = f"point {n} of {name}"
        if isinstance(p, dict):
            key = next((a for a in ID_ALIASES if a in p), None)
            if key is None or "x" not in p or "y" not in p:
                raise InputError(f"{where}: keys {sorted(p)} do not name object, x, y (and label)")
            out.append(_row_values(p[key], p["x"], p["y"], p.get("label"), where))
        elif isinstance(p, (list, tuple)) and len(p) in (3, 4):
            out.append(_row_values(*p, *([None] if len(p) == 3 else []), where))
        else:
            raise InputError(f"{where}: expected {{object, x, y, label}} or [object, x, y, label], got {p!r}")
    return out


def read_points(path: str | os.PathLike) -> PointPrompts:
    """Read a point file (CSV or JSON) into {object id: (xy (P, 2), labels (P,))}, ids ascending."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"point file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as err:
        raise InputError(f"cannot read point file {path}: {err}") from err
    is_json = text.lstrip().startswith(("{", "[")) or path.suffix.lower() == ".json"
    rows = _read_json(text, str(path)) if is_json else _read_csv(text, str(path))
    if not rows:
        raise InputError(f"point file {path} holds no points")
    grouped: dict[int, list[tuple[float, float, int]]] = {}
    for oid, x, y, label in rows:
        grouped.setdefault(oid, []).append((x, y, label))
    return {
        oid: (np.array([r[:2] for r in pts], np.float64), np.array([r[2] for r in pts], np.int64))
        for oid, pts in sorted(grouped.items())
    }


def prompts_for_objects(boxes: np.ndarray | None, points: PointPrompts, source: str) -> tuple[np.ndarray, list, list]:
    """Boxes and per-object clicks for ``BoxPredictor``: object id k is row k - 1.

    Returns ((N, 4) boxes with NaN rows for objects of clicks alone, N point lists, N label
    lists), N = the larger of the box count and the highest id; an id in between with neither
    a box nor a click is an InputError naming ``source``.
    """
    n_boxes = 0 if boxes is None else len(boxes)
    n = max(n_boxes, max(points, default=0))
    out = np.full((n, 4), np.nan)
    if n_boxes:
        out[:n_boxes] = boxes
    missing = [k for k in range(n_boxes + 1, n + 1) if k not in points]
    if missing:
        raise InputError(f"{source}: object id {missing[0]} has neither a box nor points (ids run 1..{n})")
    empty = (np.zeros((0, 2)), np.zeros(0, np.int64))
    xy, labels = zip(*[points.get(k, empty) for k in range(1, n + 1)])
    return out, list(xy), list(labels)


__all__ = ["PointPrompts", "prompts_for_objects", "read_points"]
