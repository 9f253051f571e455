"""Label TIFF writing: tiled, compressed, atomic; sparse labels render like dense pasting."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from hrmedseg.engine import ObjectMask, SparseLabels, paste_object
from hrmedseg.io import write_label_tiff


def test_label_tiff_round_trip_is_tiled_and_compressed(tmp_path):
    labels = np.zeros((700, 530), np.int32)
    labels[100:200, 50:400] = 3
    labels[600:, 500:] = 70000
    path = write_label_tiff(tmp_path / "l.tif", labels)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert page.is_tiled and page.compression != 1 and page.dtype == np.uint32
        np.testing.assert_array_equal(page.asarray(), labels)
    small = np.where(labels == 70000, 9, labels)
    assert tifffile.imread(write_label_tiff(tmp_path / "s.tif", small)).dtype == np.uint16


def test_failed_write_keeps_the_existing_file(tmp_path):
    target = tmp_path / "labels.tif"
    good = np.full((300, 300), 5, np.uint16)
    write_label_tiff(target, good)
    before = target.read_bytes()

    class Exploding:
        shape_yx = (300, 300)
        max_id = 10

        def read(self, y0, y1, x0, x1):
            if y0 >= 256:
                raise RuntimeError("disk on fire")
            return np.zeros((y1 - y0, x1 - x0), np.uint16)

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_label_tiff(target, Exploding())
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tif"]  # no temp file left


def _obj(region, seed):
    y0, y1, x0, x1 = region
    mask = np.random.default_rng(seed).random((y1 - y0, x1 - x0)) > 0.4
    return ObjectMask((x0, y0, x1, y1), region, mask, 0.5)


@pytest.mark.parametrize("overlap", ["new_wins", "keep_existing"])
def test_sparse_labels_match_dense_pasting(tmp_path, overlap):
    objs = [_obj((10, 300, 20, 90), 0), _obj((250, 1100, 50, 60), 1), _obj((100, 140, 60, 2000), 2), _obj((0, 5, 0, 5), 3)]
    dense = np.zeros((1200, 2100), np.int32)
    sparse = SparseLabels((1200, 2100), overlap=overlap)
    for i, o in enumerate(objs):
        paste_object(dense, o, i + 1, overlap)
        sparse.add(o, i + 1)
    np.testing.assert_array_equal(sparse.read(0, 1200, 0, 2100), dense)
    np.testing.assert_array_equal(sparse.read(90, 400, 1000, 1500), dense[90:400, 1000:1500])
    assert sparse.areas() == {i + 1: int((dense == i + 1).sum()) for i in range(len(objs))}
    out = write_label_tiff(tmp_path / "sparse.tif", sparse)
    np.testing.assert_array_equal(tifffile.imread(out), dense)
