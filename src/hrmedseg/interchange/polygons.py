"""Object masks <-> polygons in image pixels, exact on the pixel grid.

Convention (QuPath's, and GeoJSON's as image tools use it): x to the right, y down, pixel
(row r, column c) is the unit square [c, c + 1) x [r, r + 1). A mask's polygon is the union of its
pixels' squares, so its edges lie on the pixel grid and rasterising it again (a pixel belongs to
an object when its centre (c + 0.5, r + 0.5) is inside) gives back the very same mask. Polygons
drawn elsewhere (QuPath's brush, smooth outlines) are rasterised by the same centre rule.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry


def mask_to_geometry(mask: np.ndarray, offset_yx: tuple[int, int] = (0, 0)) -> Polygon | MultiPolygon:
    """The outline of a (H, W) bool mask: a Polygon (holes kept), or a MultiPolygon when the mask is split.

    ``offset_yx`` is where ``mask[0, 0]`` lies in the image (masks are usually cut to their box).
    Raises ValueError for an empty mask.
    """
    rows, starts, ends = _row_runs(np.asarray(mask, bool))
    if not len(rows):
        raise ValueError("an empty mask has no outline")
    oy, ox = offset_yx
    squares = shapely.box(starts + ox, rows + oy, ends + ox, rows + oy + 1)
    # Runs of one row never touch each other, runs of neighbouring rows share edges: the union
    # merges them into the mask's outline; simplify(0) drops the vertices left mid-edge.
    geometry = shapely.union_all(squares).simplify(0)
    return shapely.geometry.polygon.orient(geometry) if isinstance(geometry, Polygon) else MultiPolygon(
        [shapely.geometry.polygon.orient(p) for p in _polygons(geometry)]
    )


def _row_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row index, first column and end column (exclusive) of every horizontal run of True pixels."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    start_r, start_c = np.nonzero(edges == 1)
    _, end_c = np.nonzero(edges == -1)  # row-major order: the n-th end closes the n-th start
    return start_r.astype(float), start_c.astype(float), end_c.astype(float)


def _polygons(geometry: BaseGeometry) -> list[Polygon]:
    if isinstance(geometry, Polygon):
        return [geometry] if not geometry.is_empty else []
    return [g for part in getattr(geometry, "geoms", []) for g in _polygons(part)]


def rasterize(geometry: BaseGeometry, shape_yx: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels whose centres lie inside ``geometry``: (mask cut to the geometry's box, its offset (y, x)).

    The mask is (h, w) bool; parts outside the image are dropped (h or w may be 0).
    """
    from skimage.draw import polygon as fill_polygon

    h, w = shape_yx
    x0, y0, x1, y1 = geometry.bounds
    oy, ox = max(int(np.floor(y0)), 0), max(int(np.floor(x0)), 0)
    ey, ex = min(int(np.ceil(y1)), h), min(int(np.ceil(x1)), w)
    out = np.zeros((max(ey - oy, 0), max(ex - ox, 0)), bool)
    if not out.size:
        return out, (oy, ox)

    def fill(ring) -> np.ndarray:
        xy = np.asarray(ring.coords)
        ring_mask = np.zeros(out.shape, bool)
        # skimage tests integer points (r, c); pixel centres are at (r + 0.5, c + 0.5) here.
        rr, cc = fill_polygon(xy[:, 1] - oy - 0.5, xy[:, 0] - ox - 0.5, shape=out.shape)
        ring_mask[rr, cc] = True
        return ring_mask

    for part in _polygons(geometry):
        inside = fill(part.exterior)
        for hole in part.interiors:
            inside &= ~fill(hole)
        out |= inside
    return out, (oy, ox)
