"""Reading OME-Zarr images (NGFF 0.4 and 0.5) written by ome-zarr-py: lazily in the engine, and in the CLI.

The image is a held-out DSB 2018 photograph from ../shared, written as an NGFF pyramid by
ome-zarr-py's own writer (so the files are what other tools write, not what we write).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from hrmedseg.cli import main
from hrmedseg.io import open_image

REPO = Path(__file__).resolve().parents[1]
NUCLEI = REPO.parent / "shared" / "data" / "nuclei_dsb2018"
sys.path.insert(0, str(REPO / "scripts"))
from prepare_device_payload import is_val  # noqa: E402  the split lives in one place

pytestmark = pytest.mark.skipif(not NUCLEI.exists(), reason="real data not available")


def write_ngff_image(path: Path, version: str) -> np.ndarray:
    """A held-out DSB image as an NGFF ``version`` (C, Y, X) pyramid written by ome-zarr-py; its pixels."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    item = next(it for it in json.loads((NUCLEI / "manifest.json").read_text())["items"] if is_val(it["name"]))
    rgb = np.asarray(Image.open(NUCLEI / item["image"]).convert("RGB"))
    fmt = FormatV05() if version == "0.5" else FormatV04()
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_image(np.moveaxis(rgb, -1, 0), root, scale_factors=(2, 4), axes="cyx", fmt=fmt,
                storage_options={"chunks": (3, 64, 64)})
    return rgb


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_engine_opens_ngff_pyramid_lazily(tmp_path, version):
    path = tmp_path / "nuclei.ome.zarr"
    rgb = write_ngff_image(path, version)
    image = open_image(path)
    h, w = rgb.shape[:2]
    assert image.levels == [(h, w), (-(-h // 2), -(-w // 2)), (-(-h // 4), -(-w // 4))]
    assert image.n_channels == 3
    np.testing.assert_array_equal(image.read(10, 90, 20, 120), rgb[10:90, 20:120])
    # lazy: a chunk changed on disk after opening is what the next read sees
    level0 = zarr.open_array(str(path / "s0"), mode="r+")  # ome-zarr-py names its levels s0, s1, ...
    level0[:, 0:64, 0:64] = 7
    np.testing.assert_array_equal(image.read(0, 64, 0, 64), np.full((64, 64, 3), 7, np.uint8))
    np.testing.assert_array_equal(image.read(64, 128, 64, 128), rgb[64:128, 64:128])  # other chunks untouched


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_cli_segments_an_ngff_image(tmp_path, version, capsys):
    from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder
    from hrmedseg.models.sam import build_hrmedseg_sam, save_hrmedseg_sam
    import torch

    torch.manual_seed(0)
    model = save_hrmedseg_sam(build_hrmedseg_sam(HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))),
                              tmp_path / "tiny_sam.pt")
    path = tmp_path / "nuclei.ome.zarr"
    rgb = write_ngff_image(path, version)
    boxes = tmp_path / "b.csv"
    boxes.write_text("x0,y0,x1,y1\n10,10,60,50\n100,120,180,200\n")
    out = tmp_path / "labels.tif"
    assert main(["segment", str(path), "--boxes", str(boxes), "--out", str(out), "--model", str(model),
                 "--device", "cpu", "--no-progress"]) == 0
    assert tifffile.imread(out).shape == rgb.shape[:2]
    assert [r["id"] for r in csv.DictReader(open(tmp_path / "labels.objects.csv"))] == ["1", "2"]
