"""Crop planning, coordinate mapping, resampled reads and native-resolution thresholding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
import torch

from hrmedseg.engine import Crop, CropPolicy, logits_to_native, plan_crops, read_crop
from hrmedseg.engine.crops import box_scale, candidate_crops, choose_level, context_window, mask_region
from hrmedseg.io import open_image

POLICY = CropPolicy()


def test_scale_enlarges_small_and_shrinks_huge_boxes():
    assert box_scale(np.array([0, 0, 20, 30]), POLICY) == POLICY.max_upscale
    assert box_scale(np.array([0, 0, 20, 30]), CropPolicy(max_upscale=16)) == 8  # (30 + 2 * 16) * 8 <= 512
    assert box_scale(np.array([0, 0, 300, 200]), POLICY) == 1
    s = box_scale(np.array([0, 0, 30000, 12000]), POLICY)
    assert s == 2.0 ** math.floor(math.log2(512 / 45000))
    for size in (5, 37, 200, 900, 5000, 70000):
        box = np.array([0, 0, size, size / 2])
        s = box_scale(box, POLICY)
        assert s <= POLICY.max_upscale and math.log2(s) % 1 == 0
        assert (size * 1.5) * s <= 512 or s == POLICY.max_upscale  # box + context fits half the input


@pytest.mark.parametrize("shape", [(2048, 2048), (40000, 40000), (300, 5000), (700, 700)])
def test_every_candidate_crop_holds_box_and_context(shape):
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = rng.uniform(3, min(shape) * 0.9, 2) if rng.random() < 0.3 else rng.uniform(3, 60, 2)
        x0, y0 = rng.uniform(0, shape[1] - size[0]), rng.uniform(0, shape[0] - size[1])
        box = np.array([x0, y0, x0 + size[0], y0 + size[1]])
        cands = candidate_crops(box, POLICY, shape)
        assert cands
        cy0, cy1, cx0, cx1 = context_window(box, POLICY, shape)
        for c in cands:
            assert c.size == round(1024 / c.scale)
            assert c.y0 <= cy0 and cy1 <= c.y0 + c.size and c.x0 <= cx0 and cx1 <= c.x0 + c.size
            assert c.y0 >= 0 and c.x0 >= 0
            if shape[0] > c.size:  # a crop hangs over the edge by less than one level pixel
                assert c.y0 + c.size < shape[0] + max(1, 1 / c.scale)
            ib = c.box_to_input(box[None])[0]
            assert ib.min() >= 0 and ib.max() <= 1024
            np.testing.assert_allclose(c.input_to_native(ib[None])[0], box)


def test_nearby_boxes_share_crops_and_plan_is_deterministic():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 2000, (200, 2))
    boxes = np.c_[xy, xy + rng.uniform(10, 40, (200, 2))].clip(0, 2048)
    plan = plan_crops(boxes, (2048, 2048), POLICY)
    assert plan == plan_crops(boxes, (2048, 2048), POLICY)
    n = len(set(plan))
    # 512-pixel crops (scale 2) on a 128-pixel grid: 16 tile the image; straddling boxes need more
    assert 16 <= n <= 30, n
    one_by_one = {plan_crops(b[None], (2048, 2048), POLICY)[0] for b in boxes}
    assert n < len(one_by_one)


def test_small_image_is_one_crop():
    boxes = np.array([[10, 10, 30, 30], [200, 150, 250, 240], [5, 100, 60, 160]])
    plan = plan_crops(boxes, (256, 320), POLICY)
    assert len(set(plan)) == 1 and plan[0].y0 == plan[0].x0 == 0


def test_mask_region_is_box_plus_margin_inside_crop_and_image():
    crop = Crop(2.0, 256, 512, 512)
    box = np.array([600.0, 300.0, 640.0, 330.0])
    y0, y1, x0, x1 = mask_region(box, crop, POLICY, (2048, 2048))
    assert (y0, y1, x0, x1) == (296, 334, 596, 644)
    edge = mask_region(np.array([0.5, 0.5, 10, 10]), Crop(2.0, 0, 0, 512), POLICY, (2048, 2048))
    assert edge == (0, 14, 0, 14)


def test_choose_level():
    levels = [(40000, 40000), (20000, 20000), (10000, 10000), (5000, 5000), (2500, 2500)]
    assert choose_level(levels, levels[0], 1) == 0
    assert choose_level(levels, levels[0], 4) == 2
    assert choose_level(levels, levels[0], 6) == 2
    assert choose_level(levels, levels[0], 64) == 4
    assert choose_level([(1000, 1000)], (1000, 1000), 16) == 0


def _ramp(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x % 251, y % 241, (x + y) // 4 % 256], -1).astype(np.uint8)


def test_read_crop_upscaled_matches_bilinear_geometry():
    h, w = 600, 700
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    data = np.stack([x / 3, y / 3, np.zeros_like(x)], -1).astype(np.float32)  # linear: bilinear is exact
    im = open_image(data)
    crop = Crop(2.0, 100, 200, 512)
    t, level = read_crop(im, crop, lambda a: a.astype(np.float32))
    assert level == 0 and t.shape == (1, 3, 1000, 1000)  # 500 x 500 native rows/cols left, x2
    i = torch.arange(1, 999)
    # input pixel i has its centre at native (i + 0.5) / 2 + origin, i.e. pixel index that - 0.5
    want_x = ((i + 0.5) / 2 + 200 - 0.5) / 3
    torch.testing.assert_close(t[0, 0, 500, 1:999], want_x, atol=1e-3, rtol=0)


def test_read_crop_downscaled_uses_pyramid_and_few_tiles(tmp_path):
    data = _ramp(2048, 2048)
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, tile=(256, 256), compression="zlib", subifds=2, photometric="rgb")
        tw.write(data[1::2, 1::2], tile=(256, 256), compression="zlib", subfiletype=1, photometric="rgb")
        tw.write(data[2::4, 2::4], tile=(256, 256), compression="zlib", subfiletype=1, photometric="rgb")
    im = open_image(path)
    crop = Crop(0.25, 0, 0, 4096)  # the whole image at 1/4
    t, level = read_crop(im, crop, lambda a: a.astype(np.float32))
    assert level == 2 and t.shape == (1, 3, 512, 512)
    assert im.tiles_decoded == 4  # level 2 is 512 x 512: four tiles, nothing from level 0
    np.testing.assert_allclose(t[0].permute(1, 2, 0).numpy(), data[2::4, 2::4].astype(np.float32), atol=1e-3)
    flat = open_image(data)  # no pyramid: block means of level 0
    t2, level2 = read_crop(flat, crop, lambda a: a.astype(np.float32))
    want = data[:, :, 1].astype(np.float32).reshape(512, 4, 512, 4).mean(axis=(1, 3))
    assert level2 == 0
    np.testing.assert_allclose(t2[0, 1, :, 300].numpy(), want[:, 300], atol=1e-3)


def test_logits_thresholded_at_native_resolution_are_a_smooth_disc():
    # a known smooth logit field on SAM's 256 x 256 low-res grid: a disc of radius 9 native px
    crop = Crop(2.0, 1000, 2000, 512)
    cy, cx, r = 1100.3, 2150.7, 9.0
    g = torch.arange(256, dtype=torch.float64)
    # low-res cell j covers input [4j, 4j + 4), its centre is native origin + (4j + 2) / scale
    ny = crop.y0 + (4 * g + 2) / crop.scale
    nx = crop.x0 + (4 * g + 2) / crop.scale
    field = r - torch.sqrt((ny[:, None] - cy) ** 2 + (nx[None, :] - cx) ** 2)  # signed distance: linear
    region = (1080, 1120, 2130, 2170)
    mask = logits_to_native(field.float(), crop, region)
    yy, xx = np.mgrid[region[0] : region[1], region[2] : region[3]] + 0.5
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    # the interpolated field differs from the true distance only near the centre (cone tip);
    # along the boundary the mask must agree with the analytic disc to the pixel
    assert (mask != disc).sum() <= 2, (mask != disc).sum()
    blocky = np.kron(disc[::2, ::2], np.ones((2, 2), bool))  # what a 2x nearest blow-up would give
    assert (blocky != disc).sum() > (mask != disc).sum() + 10


def test_logits_banding_gives_the_same_mask():
    crop = Crop(0.125, 0, 0, 8192)
    field = torch.randn(256, 256)
    region = (100, 3100, 200, 2900)
    a = logits_to_native(field, crop, region)
    b = logits_to_native(field, crop, region, band_pixels=50_000)
    assert a.shape == (3000, 2700) and np.array_equal(a, b)


def test_batched_native_masks_equal_one_by_one():
    """The engine's batched thresholding gives each mask exactly as logits_to_native does,
    including empty regions, regions at the crop's edge and the per-mask fallback."""
    from hrmedseg.engine.crops import logits_to_native_batch

    crop = Crop(2.0, 100, 200, 512)
    logits = torch.randn(5, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    regions = [(110, 150, 210, 260), (300, 301, 400, 420), (120, 120, 210, 260), (100, 612, 200, 712), (500, 530, 650, 700)]
    for band_pixels in (2**22, 1000):  # one padded call; per-mask fallback
        batched = logits_to_native_batch(logits, crop, regions, 0.1, band_pixels)
        for i, region in enumerate(regions):
            single = logits_to_native(logits[i, 0], crop, region, 0.1)
            assert batched[i].shape == single.shape and np.array_equal(batched[i], single), (i, band_pixels)
    assert batched[3].any() and not batched[3].all()
