"""Point files (object id, x, y, label): CSV and JSON, errors naming the row, prompts per object."""

from __future__ import annotations

import numpy as np
import pytest

from hrmedseg.errors import InputError
from hrmedseg.io import prompts_for_objects, read_points


def test_csv_and_json_give_the_same_clicks(tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("id,x,y,label,note\n2,10.5,20,1,a\n1,3,4,negative,\n2,11,21,0,b\n")
    json_file = tmp_path / "p.json"
    json_file.write_text('{"points": [{"object": 2, "x": 10.5, "y": 20, "label": 1}, [1, 3, 4, 0], {"id": 2, "x": 11, "y": 21, "label": "-"}]}')
    for path in (csv_file, json_file):
        points = read_points(path)
        assert list(points) == [1, 2]
        np.testing.assert_array_equal(points[2][0], [[10.5, 20.0], [11.0, 21.0]])
        np.testing.assert_array_equal(points[2][1], [1, 0])
        np.testing.assert_array_equal(points[1][1], [0])


def test_label_defaults_to_positive(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("object,x,y\n1,5,6\n")
    np.testing.assert_array_equal(read_points(path)[1][1], [1])


@pytest.mark.parametrize(
    "text, message",
    [
        ("object,x,y,label\n1,5,6,1\n\n1,5,x,1\n", r"row 4 of .*p\.csv: object id, x and y must be numbers"),
        ("object,x,y,label\n1,5,6,2\n", r"row 2 of .*: label '2' is neither 1 \(positive\) nor 0"),
        ("object,x,y,label\n0,5,6,1\n", r"row 2 of .*: object id '0' is not a whole number >= 1"),
        ("object,x,y,label\n1,5\n", r"row 2 of .*: expected 4 values"),
        ("a,b,c\n1,2,3\n", r"row 1 of .*: columns .* do not name object, x, y"),
        ("object,x,y\n", r"holds no points"),
    ],
)
def test_csv_errors_name_the_row(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_points(path)


def test_json_errors_name_the_entry(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[[1, 2, 3], {"x": 1, "y": 2}]')
    with pytest.raises(InputError, match=r"point 2 of .*p\.json: keys \['x', 'y'\] do not name object"):
        read_points(path)
    with pytest.raises(InputError, match="point file not found"):
        read_points(tmp_path / "missing.csv")


def test_prompts_for_objects_pads_boxes_and_refuses_gaps():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    clicks = {2: (np.array([[25.0, 25.0]]), np.array([1])), 3: (np.array([[50.0, 50.0]]), np.array([1]))}
    out, xy, labels = prompts_for_objects(boxes, clicks, "p.csv")
    assert out.shape == (3, 4) and np.isnan(out[2]).all() and (out[:2] == boxes).all()
    assert [len(p) for p in xy] == [0, 1, 1] and labels[1].tolist() == [1]
    with pytest.raises(InputError, match="p.csv: object id 3 has neither a box nor points"):
        prompts_for_objects(boxes, {4: clicks[3]}, "p.csv")
