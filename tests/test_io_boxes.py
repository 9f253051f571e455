"""Box files and box checks: every format, every bad input names the item."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hrmedseg.errors import InputError
from hrmedseg.io import BoxClippedWarning, check_boxes, read_boxes

WANT = np.array([[10, 20, 30, 45], [5.5, 6, 7.5, 9]])


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "name, text",
    [
        ("a.csv", "x0,y0,x1,y1\n10,20,30,45\n5.5,6,7.5,9\n"),
        ("b.csv", "label,xmin,ymin,xmax,ymax\ncell,10,20,30,45\ncell,5.5,6,7.5,9\n"),
        ("c.csv", "10,20,30,45\n5.5,6,7.5,9\n\n"),
        ("d.json", json.dumps([[10, 20, 30, 45], [5.5, 6, 7.5, 9]])),
        ("e.json", json.dumps({"boxes": [{"x0": 10, "y0": 20, "x1": 30, "y1": 45}, {"x0": 5.5, "y0": 6, "x1": 7.5, "y1": 9}]})),
    ],
)
def test_formats(tmp_path, name, text):
    np.testing.assert_allclose(read_boxes(write(tmp_path, name, text)), WANT)


def test_geojson_and_napari_shapes_csv(tmp_path):
    def rect(x0, y0, x1, y1):
        return {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}

    gj = {"type": "FeatureCollection", "features": [rect(*b) for b in WANT.tolist()]}
    np.testing.assert_allclose(read_boxes(write(tmp_path, "r.geojson", json.dumps(gj))), WANT)
    # napari Shapes layer "Save as CSV": vertices in (axis-0, axis-1) = (y, x) order
    lines = ["index,shape-type,vertex-index,axis-0,axis-1"]
    for k, (x0, y0, x1, y1) in enumerate(WANT.tolist()):
        for v, (y, x) in enumerate([(y0, x0), (y0, x1), (y1, x1), (y1, x0)]):
            lines.append(f"{k},rectangle,{v},{y},{x}")
    np.testing.assert_allclose(read_boxes(write(tmp_path, "shapes.csv", "\n".join(lines) + "\n")), WANT)


def test_napari_shapes_csv_from_napari(tmp_path):
    write = pytest.importorskip("napari_builtins.io._write")
    path = tmp_path / "napari.csv"
    rect = np.array([[20, 10], [20, 30], [45, 30], [45, 10]], float)
    write.napari_write_shapes(str(path), [rect], {"shape_type": ["rectangle"]})
    np.testing.assert_allclose(read_boxes(path), WANT[:1])


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("w.csv", "a,b,c,d\n1,2,3,4\n", ["w.csv", "columns", "x0,y0,x1,y1"]),
        ("n.csv", "1,2,3\n", ["n.csv", "line 1", "4 values"]),
        ("t.csv", "x0,y0,x1,y1\n1,2,three,4\n", ["t.csv", "line 2", "'three'"]),
        ("j.json", "[[1,2,3]]", ["row 1 of box file", "j.json"]),
        ("k.json", '{"rects": []}', ["k.json", "'boxes'"]),
        ("g.geojson", json.dumps({"type": "FeatureCollection", "features": [{"geometry": {"type": "Point", "coordinates": [1, 2]}}]}), ["feature 1", "Point"]),
        ("e.csv", "\n", ["e.csv", "no rows"]),
    ],
)
def test_bad_files(tmp_path, name, text, words):
    with pytest.raises(InputError) as err:
        read_boxes(write(tmp_path, name, text))
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize(
    "boxes, words",
    [
        ([[1, 2, 3, 4], [np.nan, 1, 5, 5]], ["row 2 of boxes (nan, 1, 5, 5)", "NaN"]),
        ([[5, 5, 5, 9]], ["row 1 of boxes (5, 5, 5, 9)", "zero or negative"]),
        ([[1, 1, 4, 4], [1, 1, 4, 4], [8, 9, 3, 12]], ["row 3 of boxes (8, 9, 3, 12)", "zero or negative"]),
        ([[200, 10, 220, 20]], ["row 1 of boxes (200, 10, 220, 20)", "outside", "width 100"]),
        ([[1, 2, 3]], ["(N, 4)", "(1, 3)"]),
        ([["a", 1, 2, 3]], ["numbers"]),
    ],
)
def test_bad_boxes_name_the_box(boxes, words):
    with pytest.raises(InputError) as err:
        check_boxes(boxes, (50, 100))
    for w in words:
        assert w in str(err.value)


def test_overhanging_boxes_are_clipped_with_a_warning():
    with pytest.warns(BoxClippedWarning, match=r"1 box.*clipped: row 2 of boxes \(-5, 40, 20, 70\)"):
        out = check_boxes([[1, 2, 3, 4], [-5, 40, 20, 70]], (50, 100))
    np.testing.assert_array_equal(out, [[1, 2, 3, 4], [0, 40, 20, 50]])
