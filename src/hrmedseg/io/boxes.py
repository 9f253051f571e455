"""Box prompts: reading box files and checking boxes against an image.

Boxes are ``(N, 4)`` float arrays ``x0, y0, x1, y1`` in full-resolution image pixels, with
continuous coordinates (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``), as in SAM.

File formats (chosen by content, not only by extension):
- CSV with a header ``x0,y0,x1,y1`` (also ``xmin,ymin,xmax,ymax``; other columns are ignored),
  or 4 numeric columns without header;
- napari Shapes layer CSV export (``index,shape-type,vertex-index,axis-0,axis-1``): each shape's
  bounding rectangle (axis-0 = y, axis-1 = x);
- JSON: a list of ``[x0, y0, x1, y1]``, a list of objects with x0/y0/x1/y1 keys, ``{"boxes": [...]}``,
  or GeoJSON (Feature / FeatureCollection of Polygons, coordinates ``[x, y]``): each polygon's
  bounding rectangle.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

HEADER_ALIASES = (("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax"), ("x_min", "y_min", "x_max", "y_max"))
NAPARI_COLUMNS = ("index", "shape-type", "vertex-index", "axis-0", "axis-1")


class BoxClippedWarning(UserWarning):
    """A box overhangs the image and was clipped to it."""


def _float(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InputError(f"{where}: {value!r} is not a number") from None


def _read_csv(text: str, name: str) -> np.ndarray:
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"box file {name} has no rows")
    header = [c.strip().lower() for c in rows[0]]
    is_header = any(not _is_number(c) for c in header)
    if is_header and {"index", "axis-0", "axis-1"} <= set(header):
        return _napari_shapes(rows, header, name)
    if is_header:
        for cols in HEADER_ALIASES:
            if set(cols) <= set(header):
                idx = [header.index(c) for c in cols]
                break
        else:
            raise InputError(
                f"box file {name}: columns {rows[0]} do not name a box; expected x0,y0,x1,y1 "
                f"(or xmin,ymin,xmax,ymax), or napari's Shapes CSV export"
            )
        body, first_line = rows[1:], 2
    else:
        idx, body, first_line = [0, 1, 2, 3], rows, 1
    boxes = []
    for i, row in enumerate(body):
        where = f"box file {name}, line {first_line + i}"
        if len(row) <= max(idx):
            raise InputError(f"{where}: expected 4 values x0,y0,x1,y1, found {len(row)}: {row}")
        if not is_header and len(row) != 4:
            raise InputError(f"{where}: expected 4 values x0,y0,x1,y1 (or a header naming the columns), found {len(row)}: {row}")
        boxes.append([_float(row[j].strip(), where) for j in idx])
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _napari_shapes(rows: list[list[str]], header: list[str], name: str) -> np.ndarray:
    ci = header.index("index")
    # napari exports nD shapes with more axes; the last two are (y, x)
    axis_cols = sorted((c for c in header if c.startswith("axis-")), key=lambda c: int(c.split("-")[1]))
    cy, cx = header.index(axis_cols[-2]), header.index(axis_cols[-1])
    shapes: dict[int, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows[1:]):
        where = f"box file {name}, line {i + 2}"
        shapes.setdefault(int(_float(row[ci], where)), []).append((_float(row[cy], where), _float(row[cx], where)))
    boxes = []
    for k in sorted(shapes):
        pts = np.asarray(shapes[k])
        boxes.append([pts[:, 1].min(), pts[:, 0].min(), pts[:, 1].max(), pts[:, 0].max()])
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def parse_json(text: str, name: str, kind: str) -> Any:
    """``text`` of the ``kind`` file ("box", "point") ``name`` parsed, or InputError naming it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{kind} file {name} is not valid JSON: {err}") from err


def json_list(obj: Any, name: str, key: str) -> list:
    """The list of a parsed JSON file: ``obj`` itself, or ``obj[key]`` ("boxes", "points")."""
    kind = key[:-1] if key != "boxes" else "box"
    if isinstance(obj, dict):
        if key not in obj:
            raise InputError(f"{kind} file {name}: JSON object has no '{key}' key (keys: {sorted(obj)[:8]})")
        obj = obj[key]
    if not isinstance(obj, list):
        raise InputError(f"{kind} file {name}: expected a list of {key}")
    return obj


def _read_json(text: str, name: str) -> np.ndarray:
    obj = parse_json(text, name, "box")
    if isinstance(obj, dict) and obj.get("type") in ("FeatureCollection", "Feature"):
        features = obj["features"] if obj["type"] == "FeatureCollection" else [obj]
        boxes = []
        for i, f in enumerate(features):
            geom = (f or {}).get("geometry") or {}
            if geom.get("type") not in ("Polygon", "MultiPolygon"):
                raise InputError(f"box file {name}, feature {i + 1}: geometry type {geom.get('type')!r} is not a Polygon")
            pts = np.asarray(_flatten_coords(geom["coordinates"]), np.float64).reshape(-1, 2)
            boxes.append([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
        return np.asarray(boxes, np.float64).reshape(-1, 4)
    obj = json_list(obj, name, "boxes")
    boxes = []
    for i, b in enumerate(obj):
        where = f"row {i + 1} of box file {name}"
        if isinstance(b, dict):
            keys = next((k for k in HEADER_ALIASES if set(k) <= set(b)), None)
            if keys is None:
                raise InputError(f"{where}: keys {sorted(b)} do not name a box (x0, y0, x1, y1)")
            b = [b[k] for k in keys]
        if not isinstance(b, (list, tuple)) or len(b) != 4:
            raise InputError(f"{where}: expected [x0, y0, x1, y1], got {b!r}")
        try:
            boxes.append([float(v) for v in b])
        except (TypeError, ValueError):
            raise InputError(f"{where}: {b!r} holds a value that is not a number") from None
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def _flatten_coords(c: Any) -> list:
    if isinstance(c, (list, tuple)) and c and isinstance(c[0], (int, float)):
        return [c]
    out: list = []
    for item in c:
        out.extend(_flatten_coords(item))
    return out


def read_boxes(path: str | os.PathLike) -> np.ndarray:
    """Read a box file (CSV, napari Shapes CSV, JSON or GeoJSON) into an (N, 4) xyxy array."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"box file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as err:
        raise InputError(f"cannot read box file {path}: {err}") from err
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")) or path.suffix.lower() in (".json", ".geojson"):
        boxes = _read_json(text, str(path))
    else:
        boxes = _read_csv(text, str(path))
    if len(boxes) == 0:
        raise InputError(f"box file {path} holds no boxes")
    return boxes


SLICE_COLUMNS = ("z", "slice", "t")


def _slice_value(value: Any, where: str) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: slice {value!r} is not a number") from None
    if not math.isfinite(v) or v != int(v) or v < 0:
        raise InputError(f"{where}: slice {value!r} is not a whole number >= 0")
    return int(v)


def read_box_slices(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a stack: ((N, 4) xyxy, (N,) slice index of each box) from a box file whose rows
    carry a ``z``, ``slice`` or ``t`` column (CSV header, JSON object keys); a napari Shapes CSV
    of 3D shapes gives each shape's plane (its ``axis-0``). InputError names the file and row."""
    path = Path(path)
    boxes = read_boxes(path)
    text = path.read_text(encoding="utf-8-sig")
    missing = f"box file {path} gives no slice per box: add a column {' or '.join(SLICE_COLUMNS)} (the slice index, from 0)"
    if text.lstrip().startswith(("{", "[")) or path.suffix.lower() in (".json", ".geojson"):
        obj = parse_json(text, str(path), "box")
        rows = json_list(obj, str(path), "boxes") if not (isinstance(obj, dict) and "features" in obj) else [
            (f or {}).get("properties") or {} for f in obj["features"]]
        slices = []
        for i, row in enumerate(rows):
            key = next((k for k in SLICE_COLUMNS if isinstance(row, dict) and k in row), None)
            if key is None:
                raise InputError(f"row {i + 1} of box file {path}: no slice ({', '.join(SLICE_COLUMNS)} key); {missing}")
            slices.append(_slice_value(row[key], f"row {i + 1} of box file {path}"))
        return boxes, np.asarray(slices, np.int64)
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    header = [c.strip().lower() for c in rows[0]]
    if {"index", "axis-0", "axis-1"} <= set(header):
        axis_cols = [c for c in header if c.startswith("axis-")]
        if len(axis_cols) < 3:
            raise InputError(f"{missing} (its shapes are 2D)")
        ci, cz = header.index("index"), header.index("axis-0")
        first: dict[int, int] = {}
        for i, row in enumerate(rows[1:]):
            where = f"box file {path}, line {i + 2}"
            first.setdefault(int(_float(row[ci], where)), _slice_value(round(_float(row[cz], where)), where))
        return boxes, np.asarray([first[k] for k in sorted(first)], np.int64)
    col = next((header.index(c) for c in SLICE_COLUMNS if c in header), None)
    if col is None:
        raise InputError(missing)
    return boxes, np.asarray([_slice_value(row[col].strip() if col < len(row) else "", f"box file {path}, line {i + 2}") for i, row in enumerate(rows[1:])], np.int64)


def box_label(i: int, box: Sequence[float], source: str) -> str:
    """How messages name box ``i`` (0-based) of ``source``: 'row i+1 of SOURCE (x0, y0, x1, y1)'."""
    return f"row {i + 1} of {source} ({', '.join(f'{float(v):g}' for v in box)})"


def check_boxes(boxes: Any, shape_yx: tuple[int, int], source: str = "boxes") -> np.ndarray:
    """Validate boxes against an image; returns float64 (N, 4) boxes clipped to the image.

    Raises InputError naming the first bad box as "row N of SOURCE" (1-based, as users count
    rows) with its values (wrong shape, NaN/inf, zero or negative size, wholly outside the
    image). Boxes that only overhang the image are clipped, with a :class:`BoxClippedWarning`
    listing them the same way.
    """
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{source} must be numbers in an (N, 4) array x0, y0, x1, y1 ({err})") from None
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InputError(f"{source} must have shape (N, 4) as x0, y0, x1, y1; got shape {arr.shape}")
    h, w = shape_yx
    clipped = []
    out = arr.copy()
    for i, (x0, y0, x1, y1) in enumerate(arr):
        desc = box_label(i, arr[i], source)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise InputError(f"{desc} holds NaN or infinity")
        if x1 <= x0 or y1 <= y0:
            raise InputError(f"{desc} has zero or negative size (need x1 > x0 and y1 > y0)")
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            raise InputError(f"{desc} lies outside the image (width {w}, height {h})")
        c = (max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h)))
        if c != (x0, y0, x1, y1):
            clipped.append(desc)
            out[i] = c
    if clipped:
        shown = "; ".join(clipped[:10]) + (" ..." if len(clipped) > 10 else "")
        warnings.warn(
            f"{len(clipped)} box(es) overhang the image ({w} x {h}) and were clipped: {shown}",
            BoxClippedWarning,
            stacklevel=2,
        )
    return out
