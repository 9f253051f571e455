"""Lazy readers: axes, channels, dtypes, local tile reads, pyramids, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hrmedseg.errors import InputError
from hrmedseg.io import ArrayImage, TiffImage, open_image

DSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuclei_dsb2018"


def rgb(h=600, w=700, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_axes_inference_and_read_layout():
    grey = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    im = open_image(grey)
    assert im.shape_yx == (40, 50) and im.channels == (0,)
    np.testing.assert_array_equal(im.read(3, 7, 10, 20)[..., 0], grey[3:7, 10:20])
    cyx = np.stack([grey, grey + 1, grey + 2, grey + 3])
    im = open_image(cyx, channel=[2, 0])
    assert im.shape_yx == (40, 50) and im.n_source_channels == 4
    np.testing.assert_array_equal(im.read(0, 5, 0, 5), np.stack([grey[:5, :5] + 2, grey[:5, :5]], -1))
    yxc = rgb(40, 50)
    np.testing.assert_array_equal(open_image(yxc).read(1, 4, 2, 9), yxc[1:4, 2:9])
    rgba = np.concatenate([yxc, np.full((40, 50, 1), 255, np.uint8)], -1)
    assert open_image(rgba).channels == (0, 1, 2)
    assert open_image(grey[None, None]).shape_yx == (40, 50)


@pytest.mark.parametrize(
    "data, kwargs, words",
    [
        (np.zeros((5, 3, 40, 50), np.uint16), {}, ["4 dimensions", "(5, 3, 40, 50)"]),
        (np.zeros((40, 50), bool), {}, ["bool"]),
        (np.zeros((40, 50), np.complex64), {}, ["complex64"]),
        (np.zeros((5, 40, 50), np.uint16), {}, ["5 channels", "channel"]),
        (np.zeros((3, 40, 50), np.uint16), {"channel": 7}, ["channel 7", "3 channel"]),
        (np.zeros((3, 40, 50), np.uint16), {"channel": [0, 1, 2, 0]}, ["1 to 3"]),
    ],
)
def test_bad_arrays_name_the_problem(data, kwargs, words):
    with pytest.raises(InputError) as err:
        open_image(data, **kwargs)
    for w in words:
        assert w in str(err.value)


def _pyramid_tiff(path, data, tile=128):
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(data, tile=(tile, tile), compression="zlib", subifds=2, photometric="rgb")
        tw.write(data[::2, ::2], tile=(tile, tile), compression="zlib", subfiletype=1, photometric="rgb")
        tw.write(data[::4, ::4], tile=(tile, tile), compression="zlib", subfiletype=1, photometric="rgb")


def test_tiled_tiff_reads_only_touched_tiles(tmp_path):
    data = rgb(1000, 1200)
    path = tmp_path / "slide.tif"
    _pyramid_tiff(path, data)
    im = open_image(path)
    assert isinstance(im, TiffImage)
    assert im.levels == [(1000, 1200), (500, 600), (250, 300)]
    np.testing.assert_array_equal(im.read(10, 100, 20, 120), data[10:100, 20:120])
    assert im.tiles_decoded == 1  # inside tile (0, 0)
    np.testing.assert_array_equal(im.read(100, 300, 100, 300), data[100:300, 100:300])
    assert im.tiles_decoded == 1 + 8  # 3 x 3 tiles touched, (0, 0) cached
    np.testing.assert_array_equal(im.read(0, 250, 0, 300, level=2), data[::4, ::4])
    np.testing.assert_array_equal(im.read(990, 1000, 1190, 1200), data[990:, 1190:])


@pytest.mark.parametrize("kind", ["strips", "planar", "contiguous", "ome_pages"])
def test_tiff_layouts(tmp_path, kind):
    path = tmp_path / f"{kind}.tif"
    data = np.random.default_rng(1).integers(0, 60000, (3, 300, 200), dtype=np.uint16)
    if kind == "strips":
        tifffile.imwrite(path, np.moveaxis(data, 0, -1), rowsperstrip=16, compression="zlib", photometric="rgb")
    elif kind == "planar":
        tifffile.imwrite(path, data, planarconfig="separate", photometric="rgb", tile=(64, 64))
    elif kind == "contiguous":
        tifffile.imwrite(path, np.moveaxis(data, 0, -1), photometric="rgb")
    else:
        path = tmp_path / "x.ome.tif"
        tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"})
    im = open_image(path, channel=[2, 1, 0] if kind == "ome_pages" else None)
    want = np.moveaxis(data, 0, -1)
    if kind == "ome_pages":
        want = want[..., ::-1]
    np.testing.assert_array_equal(im.read(50, 120, 30, 190), want[50:120, 30:190])
    assert im.dtype == np.uint16


def test_tiff_with_time_axis_is_refused(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, np.zeros((4, 2, 30, 40), np.uint16), imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(InputError, match="axis T has size 4"):
        open_image(path)


def test_truncated_and_corrupt_files(tmp_path):
    data = rgb(512, 512)
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, data, tile=(128, 128), compression="zlib", photometric="rgb")
    raw = path.read_bytes()
    # keep the header and IFD (written first by tifffile? no: IFD is at the end) -> drop tile bytes
    tf = tifffile.TiffFile(path)
    first = tf.pages[0].dataoffsets[5]
    tf.close()
    broken = bytearray(raw)
    broken[first : first + 200] = b"\0" * 200
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(broken))
    im = open_image(bad)
    with pytest.raises(InputError, match="bad.tif"):
        im.read(0, 512, 0, 512)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\0garbage" * 3)
    with pytest.raises(InputError, match="junk.tif"):
        open_image(junk)
    png = tmp_path / "half.png"
    from PIL import Image

    Image.fromarray(data).save(png)
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    with pytest.raises(InputError, match="half.png"):
        open_image(png)
    with pytest.raises(InputError, match="not found"):
        open_image(tmp_path / "missing.tif")


def test_png_jpeg_and_real_nuclei_image(tmp_path):
    manifest = json.loads((DSB / "manifest.json").read_text()) if (DSB / "manifest.json").exists() else None
    if manifest is None:
        pytest.skip("DSB data not present")
    item = manifest["items"][0]
    im = open_image(DSB / item["image"])
    assert im.shape_yx == (item["height"], item["width"])
    assert im.read(0, 8, 0, 8).shape == (8, 8, im.n_channels)
    from PIL import Image

    jpg = tmp_path / "a.jpg"
    Image.fromarray(rgb(64, 80)).save(jpg, quality=95)
    im = open_image(jpg)
    assert im.shape_yx == (64, 80) and im.n_channels == 3 and im.dtype == np.uint8
    png16 = tmp_path / "g16.png"
    g = (np.arange(64 * 80).reshape(64, 80) * 7).astype(np.uint16)
    Image.fromarray(g).save(png16)
    im = open_image(png16)
    np.testing.assert_array_equal(im.read(0, 64, 0, 80)[..., 0], g)


def test_zarr_ome_zarr_and_dask(tmp_path):
    import dask.array as da
    import zarr

    data = np.random.default_rng(2).integers(0, 4000, (2, 300, 256), dtype=np.uint16)
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    root.create_array("0", data=data, chunks=(1, 64, 64))
    root.create_array("1", data=data[:, ::2, ::2], chunks=(1, 64, 64))
    root.attrs["multiscales"] = [
        {"axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}], "datasets": [{"path": "0"}, {"path": "1"}]}
    ]
    im = open_image(tmp_path / "img.ome.zarr", channel=1)
    assert im.levels == [(300, 256), (150, 128)]
    np.testing.assert_array_equal(im.read(10, 20, 30, 40)[..., 0], data[1, 10:20, 30:40])
    np.testing.assert_array_equal(im.read(0, 5, 0, 5, level=1)[..., 0], data[1, :10:2, :10:2])
    arr = zarr.open_array(str(tmp_path / "plain.zarr"), mode="w", shape=(300, 256), dtype="u2", chunks=(64, 64))
    arr[:] = data[0]
    np.testing.assert_array_equal(open_image(tmp_path / "plain.zarr").read(0, 3, 0, 3)[..., 0], data[0, :3, :3])
    d = da.from_array(data[0], chunks=64)
    a, b = open_image(d), open_image(d)
    assert a.source_key == b.source_key and a.source_key.startswith("dask:")
    np.testing.assert_array_equal(a.read(5, 9, 5, 9)[..., 0], data[0, 5:9, 5:9])


def test_array_keys_are_per_object():
    a = np.zeros((20, 20), np.uint8)
    b = a.copy()
    assert open_image(a).source_key == open_image(a).source_key
    assert open_image(a).source_key != open_image(b).source_key
    assert isinstance(open_image(a), ArrayImage)
