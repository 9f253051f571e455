"""Training data: pair discovery, bad input, classes, objects and boxes, crops and augmentation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hrmedseg.errors import InputError
from hrmedseg.training.data import (
    CropSettings,
    SegmentationCrops,
    augment_geometry,
    class_channels,
    collate,
    discover_samples,
    jitter_box,
    mask_box,
    object_masks,
    parse_classes,
    place,
    read_image,
    read_mask,
    split_samples,
)


def disks(shape=(96, 120), n=5, seed=0) -> np.ndarray:
    """Instance labels: ``n`` non-overlapping-ish disks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        cy, cx, r = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10), rng.integers(4, 9)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return labels


def write_pair(root, name, labels, image=None, ext="png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.where(labels > 0, 200, 30).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"{name}.{ext}")
    Image.fromarray(labels.astype(np.uint16) if labels.max() > 255 else labels.astype(np.uint8)).save(
        root / "masks" / f"{name}.png"
    )


def write_disk_dataset(root, images: int, disks_per_image: int, shape=(72, 80)):
    """``images`` image/mask pairs of ``disks`` (seeds 0, 1, ...) under ``root``; returns ``root``."""
    for i in range(images):
        write_pair(root, f"im{i}", disks(shape, n=disks_per_image, seed=i))
    return root


def test_read_image_converts_grey_rgba_and_16_bit(tmp_path):
    grey = (np.arange(64 * 80) % 256).astype(np.uint8).reshape(64, 80)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgba = np.dstack([grey, grey // 2, grey // 3, np.full_like(grey, 7)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    deep = (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 9) + 1000
    tifffile.imwrite(tmp_path / "d.tif", deep)
    g, a, d = read_image(tmp_path / "g.png"), read_image(tmp_path / "a.png"), read_image(tmp_path / "d.tif")
    assert g.shape == a.shape == d.shape == (64, 80, 3) and g.dtype == a.dtype == d.dtype == np.uint8
    assert np.array_equal(g[..., 1], grey) and np.array_equal(a[..., 1], grey // 2)
    assert d.min() == 0 and d.max() == 255 and np.all(np.diff(d[..., 0].ravel().astype(int)) >= 0)


def test_discover_pairs_skips_mismatched_and_unreadable(tmp_path, caplog):
    write_pair(tmp_path, "good", disks())
    write_pair(tmp_path, "wrong_size", disks((50, 60)), image=np.zeros((40, 60), np.uint8))
    write_pair(tmp_path, "broken", disks())
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "images" / "orphan.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        info = discover_samples(tmp_path)
    assert [s.name for s in info.samples] == ["good"]
    assert any("wrong_size" in s and "does not match" in s for s in info.skipped)
    assert any("broken" in s and "unreadable" in s for s in info.skipped)
    image, labels = info.samples[0].load()
    assert image.shape[:2] == labels.shape and labels.max() == 5


def test_no_pairs_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path)):
        discover_samples(tmp_path)
    with pytest.raises(InputError, match="not found"):
        discover_samples(tmp_path / "missing")
    write_pair(tmp_path, "only", disks((40, 40)), image=np.zeros((30, 30), np.uint8))
    with pytest.raises(InputError, match="no usable"):
        discover_samples(tmp_path)


def test_colour_mask_with_different_channels_is_refused(tmp_path):
    Image.fromarray(np.dstack([np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8), np.zeros((8, 8), np.uint8)])).save(
        tmp_path / "m.png")
    with pytest.raises(InputError, match="m.png"):
        read_mask(tmp_path / "m.png")


def test_split_is_by_image_and_keeps_both_sides(tmp_path):
    write_disk_dataset(tmp_path, images=7, disks_per_image=5, shape=(96, 120))
    samples = discover_samples(tmp_path).samples
    train, val = split_samples(samples, 0.15, seed=3)
    assert len(val) == 1 and len(train) == 6
    assert {s.name for s in train}.isdisjoint({s.name for s in val})
    train1, val1 = split_samples(samples[:1], 0.5)
    assert len(train1) == 1 and val1 == []


def test_class_rules_make_disc_and_cup_channels():
    labels = np.array([[0, 1, 2, 2], [0, 1, 1, 2]])
    rules = parse_classes("disc:>=1,cup:2")
    channels = class_channels(labels, rules)
    assert [r.name for r in rules] == ["disc", "cup"]
    assert channels.tolist() == [[[0, 1, 1, 1], [0, 1, 1, 1]], [[0, 0, 1, 1], [0, 0, 0, 1]]]
    assert class_channels(labels, None).tolist() == [[[0, 1, 1, 1], [0, 1, 1, 1]]]
    assert parse_classes("a:1|3")[0].apply(np.array([1, 2, 3])).tolist() == [True, False, True]
    with pytest.raises(InputError, match="NAME:RULE"):
        parse_classes("disc")


def test_objects_are_instances_or_class_components():
    labels = disks(n=4, seed=1)
    n_instances = len(np.unique(labels)) - 1
    masks = object_masks(labels, None)
    assert len(masks) == n_instances
    assert all(np.array_equal(m, labels == i) for m, i in zip(masks, np.unique(labels)[1:]))
    assert len(object_masks(labels, None, max_objects=2, rng=np.random.default_rng(0))) == 2
    two_blobs = np.zeros((20, 20), np.int32)
    two_blobs[2:5, 2:5] = 1
    two_blobs[10:15, 10:15] = 1
    assert len(object_masks(two_blobs, parse_classes("x:1"))) == 2


def test_box_is_tight_and_jitter_stays_in_image():
    m = np.zeros((30, 40), bool)
    m[5:11, 7:20] = True
    box = mask_box(m)
    assert box.tolist() == [7, 5, 20, 11]
    rng = np.random.default_rng(0)
    moved = np.stack([jitter_box(box, rng, 0.2, 20, m.shape) for _ in range(200)])
    assert not np.allclose(moved, box)
    assert np.all(np.abs(moved - box) <= np.array([13, 6, 13, 6]) * 0.2 + 1e-4)
    assert moved[:, [0, 2]].min() >= 0 and moved[:, [0, 2]].max() <= 40


def test_crop_is_native_resolution_and_pads_small_images():
    rng = np.random.default_rng(0)
    labels = np.zeros((300, 200), np.int32)
    labels[250:260, 150:160] = 1
    image = np.dstack([labels.astype(np.uint8) * 255] * 3)
    settings = CropSettings(size=64, foreground_prob=1.0)
    for _ in range(5):
        img, lab, valid = place(image, labels, settings, rng)
        assert img.shape == (64, 64, 3) and lab.shape == (64, 64) and valid == (64, 64)
        assert lab.sum() == 100  # the whole object, at native scale
        assert np.array_equal(img[..., 0] > 0, lab > 0)
    img, lab, valid = place(image[:40, :30], labels[:40, :30], settings, rng)
    assert valid == (40, 30) and np.all(img[40:] == settings.pad_value) and lab[40:].sum() == 0
    img, lab, valid = place(image, labels, CropSettings(size=100, mode="fit"), rng)
    assert valid == (100, 67) and 15 < lab.sum() < 35  # 10 x 10 object at 1/3 scale


def test_geometric_augmentation_moves_image_and_labels_together():
    rng = np.random.default_rng(1)
    labels = disks((64, 64), seed=2).astype(np.int32)
    image = np.dstack([labels.astype(np.uint8) * 30] * 3)
    for _ in range(8):
        img, lab = augment_geometry([image, labels], rng)
        assert np.array_equal(img[..., 0], lab.astype(np.uint8) * 30)


def test_dataset_items_and_collate(tmp_path):
    write_disk_dataset(tmp_path, images=3, disks_per_image=5, shape=(96, 120))
    samples = discover_samples(tmp_path).samples
    box_set = SegmentationCrops(samples, "box", CropSettings(size=64), max_boxes=3)
    items = [box_set[i] for i in range(3)]
    for it in items:
        assert it["image"].shape == (3, 64, 64) and it["image"].dtype == torch.uint8
        k = len(it["boxes"])
        assert k <= 3 and it["masks"].shape == (k, 64, 64)
        for box, mask in zip(it["boxes"], it["masks"]):  # the jittered box still overlaps its object
            x0, y0, x1, y1 = box.round().int().tolist()
            assert mask[y0:y1, x0:x1].sum() > 0.5 * mask.sum()
    batch = collate(items)
    assert batch["image"].shape == (3, 3, 64, 64) and len(batch["boxes"]) == 3
    val_set = SegmentationCrops(samples, "semantic", CropSettings(size=64), train=False)
    a, b = val_set[1], val_set[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert a["target"].shape == (1, 64, 64)


def test_annotation_store_is_read_as_training_data(tmp_path):
    from hrmedseg.store import AnnotationStore, ImageAnnotation, objects_from_labels

    labels = disks((50, 60), n=3, seed=4).astype(np.uint32)
    image_path = tmp_path / "cells.png"
    Image.fromarray(np.where(labels > 0, 220, 20).astype(np.uint8)).save(image_path)
    store = AnnotationStore.create(tmp_path / "project")
    store.save(ImageAnnotation("cells", str(image_path), labels, objects_from_labels(labels)))
    info = discover_samples(tmp_path / "project")
    assert info.layout == "annotation store" and [s.name for s in info.samples] == ["cells"]
    image, loaded = info.samples[0].load()
    assert image.shape == (50, 60, 3) and np.array_equal(loaded, labels)
    empty = AnnotationStore.create(tmp_path / "empty")
    with pytest.raises(InputError, match="no annotated images"):
        discover_samples(empty.path)
