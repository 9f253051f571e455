"""``hrmedseg segment`` end to end with a small real-format model file."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from hrmedseg.cli import main
from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    import torch

    from hrmedseg.models.sam import build_hrmedseg_sam, save_hrmedseg_sam

    torch.manual_seed(0)
    model = build_hrmedseg_sam(HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))))
    return save_hrmedseg_sam(model, tmp_path_factory.mktemp("w") / "tiny_sam.pt")


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 1000, (600, 700), dtype=np.uint16)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="zlib")
    return path


def test_segment_writes_labels_and_table(tmp_path, image_file, model_file, capsys):
    boxes = tmp_path / "b.csv"
    boxes.write_text("x0,y0,x1,y1\n10,10,60,50\n300,200,380,290\n650,500,720,620\n")
    out = tmp_path / "out" / "labels.tif"
    rc = main(["segment", str(image_file), "--boxes", str(boxes), "--out", str(out), "--model", str(model_file), "--device", "cpu", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "box(es) overhang" in err and "2" in err
    labels = tifffile.imread(out)
    assert labels.shape == (600, 700) and labels.dtype == np.uint16
    with tifffile.TiffFile(out) as tf:
        assert tf.pages[0].is_tiled
    rows = list(csv.DictReader(open(tmp_path / "out" / "labels.objects.csv")))
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    assert rows[2]["x1"] == "700.00" and rows[2]["y1"] == "600.00"  # clipped
    for r in rows:
        assert int(r["area"]) == int((labels == int(r["id"])).sum())
        assert (int(r["area"]) == 0) == (r["empty"] == "1")
    assert set(np.unique(labels)) <= {0, 1, 2, 3}


def test_bad_boxes_fail_cleanly_and_keep_old_output(tmp_path, image_file, model_file, capsys):
    out = tmp_path / "labels.tif"
    out.write_bytes(b"previous good result")
    boxes = tmp_path / "bad.csv"
    boxes.write_text("x0,y0,x1,y1\n10,10,60,50\n5000,10,5100,50\n")
    rc = main(["segment", str(image_file), "--boxes", str(boxes), "--out", str(out), "--model", str(model_file), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"row 2 of box file {boxes} (5000, 10, 5100, 50)" in err and "outside" in err and "Traceback" not in err
    assert out.read_bytes() == b"previous good result"
    cols = tmp_path / "cols.csv"
    cols.write_text("left,top,right,bottom\n1,2,3,4\n")
    assert main(["segment", str(image_file), "--boxes", str(cols), "--out", str(out), "--model", str(model_file)]) == 2
    assert "cols.csv" in capsys.readouterr().err


def test_default_model_ships_and_segments(tmp_path, image_file):
    boxes = tmp_path / "b.json"
    boxes.write_text("[[10, 10, 60, 50]]")
    out = tmp_path / "l.tif"
    rc = main(["segment", str(image_file), "--boxes", str(boxes), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0
    labels = tifffile.imread(out)
    assert labels.shape == (600, 700)
    # only the box's neighbourhood is ever written
    assert not labels[:, 80:].any() and not labels[80:].any()


def test_missing_registry_weights_is_a_clear_error(tmp_path, image_file, capsys, monkeypatch):
    monkeypatch.setenv("HRMEDSEG_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("HRMEDSEG_WEIGHTS_DIR", raising=False)
    boxes = tmp_path / "b.json"
    boxes.write_text("[[10, 10, 60, 50]]")
    rc = main(["segment", str(image_file), "--boxes", str(boxes), "--out", str(tmp_path / "l.tif"),
               "--model", "sam_vit_b", "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "sam_vit_b_01ec64.pth" in err and "HRMEDSEG_WEIGHTS_DIR" in err and "Traceback" not in err
    assert not (tmp_path / "l.tif").exists()


def test_corrupt_image_names_the_file(tmp_path, model_file, capsys):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\0" + b"\xff" * 50)
    boxes = tmp_path / "b.csv"
    boxes.write_text("1,1,5,5\n")
    assert main(["segment", str(bad), "--boxes", str(boxes), "--out", str(tmp_path / "l.tif"), "--model", str(model_file)]) == 2
    assert "broken.tif" in capsys.readouterr().err


def test_empty_masks_are_reported_by_row(tmp_path, image_file, model_file, capsys, monkeypatch):
    """A box whose mask comes out empty is named in a warning (row N of the box file), not a crash."""
    from hrmedseg.cli import segment as segment_cli

    real_load = segment_cli.load_predictor

    def load_blind_predictor(args):
        predictor = real_load(args)
        predictor.mask_threshold = 1e9  # no logit reaches it: every box gives an empty mask
        return predictor

    monkeypatch.setattr(segment_cli, "load_predictor", load_blind_predictor)
    boxes = tmp_path / "b.csv"
    boxes.write_text("x0,y0,x1,y1\n10,10,60,50\n300,200,380,290\n")
    out = tmp_path / "labels.tif"
    rc = main(["segment", str(image_file), "--boxes", str(boxes), "--out", str(out), "--model", str(model_file), "--device", "cpu", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "2 box(es) gave empty masks" in err and f"row 2 of box file {boxes} (300, 200, 380, 290)" in err
    assert not tifffile.imread(out).any()
