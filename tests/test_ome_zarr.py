"""OME-Zarr label images: chunked, sparse, pyramidal, atomic; read back by zarr, ome-zarr-py and napari."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from hrmedseg.engine import ObjectMask, SparseLabels
from hrmedseg.errors import InputError
from hrmedseg.io import open_image, write_label_image


def _labels(shape=(300, 500)) -> np.ndarray:
    labels = np.zeros(shape, np.uint16)
    labels[10:40, 20:90] = 1
    labels[200:290, 400:480] = 7
    return labels


def _stored_chunks(level_dir) -> int:
    return sum(1 for p in level_dir.rglob("*") if p.is_file() and not p.name.startswith((".", "zarr.json")))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_written_pyramid_reads_back_with_zarr_and_ome_zarr(tmp_path, version):
    labels = _labels()
    out = write_label_image(tmp_path / "l.ome.zarr", labels, chunk=64, colors={1: (255, 0, 0), 7: (0, 0, 255, 128)}, version=version)
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == (3 if version == "0.5" else 2)
    np.testing.assert_array_equal(group["0"][:], labels)
    # nearest-neighbour levels keep only label values, at every second pixel
    np.testing.assert_array_equal(group["1"][:], labels[::2, ::2])
    np.testing.assert_array_equal(group["2"][:], labels[::4, ::4])
    assert max(group[str(len(list(group.arrays())) - 1)].shape) <= 64
    # only chunks with labels are stored (of the 5 x 8 grid of 64 px chunks)
    nonempty = sum(labels[y : y + 64, x : x + 64].any() for y in range(0, 300, 64) for x in range(0, 500, 64))
    assert 0 < nonempty < 40 and _stored_chunks(out / "0") == nonempty
    attrs = dict(group.attrs)
    meta = attrs["ome"] if version == "0.5" else attrs
    assert meta["image-label"]["colors"] == [{"label-value": 1, "rgba": [255, 0, 0, 255]}, {"label-value": 7, "rgba": [0, 0, 255, 128]}]

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(out)))())
    assert any(isinstance(s, Label) for s in nodes[0].specs)
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), labels)
    # and hrmedseg opens it as an image (a pyramid, lazily)
    image = open_image(out)
    assert image.levels[:2] == [(300, 500), (150, 250)]
    np.testing.assert_array_equal(image.read(0, 300, 0, 500)[..., 0], labels)


def test_sparse_labels_are_rendered_chunk_by_chunk(tmp_path):
    sparse = SparseLabels((5000, 6000))
    mask = np.ones((30, 40), bool)
    sparse.add(ObjectMask((100, 100, 140, 130), (100, 130, 100, 140), mask, 1.0), 1)
    sparse.add(ObjectMask((5900, 4900, 5940, 4930), (4900, 4930, 5900, 5940), mask, 1.0), 2)
    reads = []
    real_read = sparse.read
    sparse.read = lambda *w: (reads.append(w), real_read(*w))[1]
    out = write_label_image(tmp_path / "s.ome.zarr", sparse, chunk=1024)
    assert all((y1 - y0) <= 1024 and (x1 - x0) <= 1024 for y0, y1, x0, x1 in reads)
    level0 = zarr.open_array(str(out / "0"), mode="r")
    assert level0[100:130, 100:140].min() == 1 and level0[4900:4930, 5900:5940].min() == 2
    assert _stored_chunks(out / "0") == 2


def test_napari_reader_opens_labels(tmp_path):
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    out = write_label_image(tmp_path / "n.ome.zarr", _labels(), chunk=64)
    reader = napari_ome_zarr.napari_get_reader(str(out))
    assert reader is not None
    layers = reader(str(out))
    kinds = [layer[2] if len(layer) > 2 else "image" for layer in layers]
    assert "labels" in kinds


def test_failed_write_keeps_previous_store(tmp_path):
    out = write_label_image(tmp_path / "k.ome.zarr", _labels(), chunk=64)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    class Broken:
        shape_yx = (300, 500)
        max_id = 3

        def read(self, y0, y1, x0, x1):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        write_label_image(out, Broken(), chunk=64)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["k.ome.zarr"]  # no temporary folder left
    with pytest.raises(InputError, match="NGFF version"):
        write_label_image(tmp_path / "v.ome.zarr", _labels(), version="0.3")
    with pytest.raises(InputError, match="colour of label 1"):
        write_label_image(tmp_path / "c.ome.zarr", _labels(), colors={1: (300, 0, 0)})


def test_open_ngff_04_image_written_by_ome_zarr_py(tmp_path):
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (3, 128, 160), dtype=np.uint8)
    path = tmp_path / "img.ome.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    write_image(data, root, axes="cyx", fmt=FormatV04(), scaler=None)
    image = open_image(path)
    assert image.shape_yx == (128, 160) and image.n_channels == 3
    np.testing.assert_array_equal(image.read(10, 20, 30, 50), np.moveaxis(data[:, 10:20, 30:50], 0, -1))
    assert json.loads((path / ".zattrs").read_text())["multiscales"][0]["version"] == "0.4"


def test_sparse_windows_match_dense_rendering():
    rng = np.random.default_rng(3)
    sparse = SparseLabels((257, 301))
    dense = np.zeros((257, 301), np.uint16)
    for i in range(1, 9):
        y0, x0 = rng.integers(0, 200, 2)
        h, w = rng.integers(5, 57, 2)
        mask = rng.random((h, w)) < 0.6
        sparse.add(ObjectMask((x0, y0, x0 + w, y0 + h), (y0, y0 + h, x0, x0 + w), mask, 1.0), i)
        dense[y0 : y0 + h, x0 : x0 + w][mask] = i
    for _ in range(20):
        y0, x0 = rng.integers(0, 250, 2)
        y1, x1 = y0 + rng.integers(1, 60), x0 + rng.integers(1, 60)
        np.testing.assert_array_equal(sparse.read(y0, min(y1, 257), x0, min(x1, 301)), dense[y0:y1, x0:x1])
