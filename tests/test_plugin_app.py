"""hrmedseg-annotate's image opening: a tiled OME-TIFF pyramid becomes a lazy multiscale layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch._dynamo  # noqa: F401  (load triton before napari's OpenGL context; see guard_torch_import)

pytestmark = pytest.mark.gui


def _pyramid(path, data):
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        tw.write(data, tile=(256, 256), subifds=2, metadata={"axes": "YX"})
        tw.write(data[::2, ::2], tile=(256, 256), subfiletype=1)
        tw.write(data[::4, ::4], tile=(256, 256), subfiletype=1)


def test_pyramid_opens_lazily_and_annotates(make_napari_viewer, qtbot, tmp_path):
    import zarr

    from napari_hrmedseg.annotate_app import add_image, build_parser
    from hrmedseg.data import load_sample
    from napari_hrmedseg.annotator_widget import AnnotatorWidget

    tile = load_sample("nuclei_fluorescence")
    data = np.tile(tile, (4, 4))[:2048, :2560]
    path = tmp_path / "slide.ome.tif"
    _pyramid(path, data)
    viewer = make_napari_viewer()
    layer = add_image(viewer, path)
    assert layer.multiscale and isinstance(layer.data[0], zarr.Array)
    assert [tuple(a.shape) for a in layer.data] == [(2048, 2560), (1024, 1280), (512, 640)]
    widget = AnnotatorWidget(viewer)
    ann = widget.annotator
    assert ann.image_layer is layer and ann.labels_layer.data.shape == (2048, 2560)
    assert ann.image_key() == "slide"
    args = build_parser().parse_args(["--image", str(path), "--project", str(tmp_path / "p")])
    assert args.image == path
    widget.close()
