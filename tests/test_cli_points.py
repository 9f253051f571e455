"""``hrmedseg segment --points``: clicks on top of boxes and objects of clicks alone, from a file."""

from __future__ import annotations

import csv

import numpy as np
import tifffile

from hrmedseg.cli import main
from hrmedseg.engine import BoxPredictor
from test_cli_segment import image_file, model_file  # noqa: F401  (fixtures)


def test_points_refine_boxes_and_start_objects(tmp_path, image_file, model_file, capsys):  # noqa: F811
    boxes = tmp_path / "b.csv"
    boxes.write_text("x0,y0,x1,y1\n100,100,180,170\n300,200,380,290\n")
    points = tmp_path / "p.csv"
    points.write_text("object,x,y,label\n1,140,130,1\n1,110,160,0\n3,500,400,1\n")
    out = tmp_path / "labels.tif"
    args = ["segment", str(image_file), "--boxes", str(boxes), "--points", str(points), "--out", str(out),
            "--model", str(model_file), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    labels = tifffile.imread(out)
    rows = list(csv.DictReader(open(tmp_path / "labels.objects.csv")))
    assert [r["id"] for r in rows] == ["1", "2", "3"]

    # The same prompts through the engine give the same label image.
    predictor = BoxPredictor(str(model_file), device="cpu")
    expected, _ = predictor.segment(
        tifffile.imread(image_file), np.array([[100, 100, 180, 170], [300, 200, 380, 290], [np.nan] * 4]),
        points=[[[140, 130], [110, 160]], None, [[500, 400]]], point_labels=[[1, 0], None, [1]],
    )
    np.testing.assert_array_equal(labels, expected)
    # Each click's native pixel has its label (the default "pixel" update guarantees it).
    assert labels[130, 140] == 1 and labels[160, 110] != 1 and labels[400, 500] == 3


def test_bad_point_file_is_one_error_line(tmp_path, image_file, model_file, capsys):  # noqa: F811
    boxes = tmp_path / "b.csv"
    boxes.write_text("x0,y0,x1,y1\n100,100,180,170\n")
    points = tmp_path / "p.csv"
    points.write_text("object,x,y,label\n1,140,130,1\n3,5000,400,1\n")
    out = tmp_path / "labels.tif"
    base = ["segment", str(image_file), "--boxes", str(boxes), "--out", str(out), "--model", str(model_file), "--device", "cpu"]
    assert main(base + ["--points", str(points)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "object id 2 has neither a box nor points" in err[0]
    points.write_text("object,x,y,label\n1,140,130,1\n2,5000,400,1\n")
    assert main(base + ["--points", str(points)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "point (5000, 400) of object 1 lies outside the image" in err[0] and "id i + 1" in err[0]
    assert not out.exists()
