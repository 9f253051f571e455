"""COCO instance segmentation JSON: RLE masks, boxes, areas, images and the store's classes as categories.

One file holds any number of images. Categories are the store's classes (``id`` = class index,
1-based, plus ``color``); unclassified objects go to an extra category named
:data:`UNCLASSIFIED`, which is read back as "no class". Each annotation carries hrmedseg's own
fields under ``hrmedseg`` ({object_id, model, edited}) and the model's ``score``. Images carry
``image_key`` so that importing the file finds the same store images again.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import atomic_path
from ..errors import InputError
from ..store import ImageAnnotation, ObjectClass, image_key_for
from .objects import ImportedObject, labels_2d, object_masks

UNCLASSIFIED = "object"


def to_coco(annotations: Sequence[ImageAnnotation], classes: Sequence[ObjectClass]) -> dict[str, Any]:
    """A COCO dict for ``annotations`` (one image entry each)."""
    from pycocotools import mask as mask_utils

    categories = [{"id": i + 1, "name": c.name, "color": list(c.color), "supercategory": "object"}
                  for i, c in enumerate(classes)]
    category_ids = {c["name"]: c["id"] for c in categories}
    images, coco_annotations = [], []
    unclassified_used = False
    for image_id, annotation in enumerate(annotations, start=1):
        h, w = labels_2d(annotation).shape
        images.append({"id": image_id, "file_name": Path(annotation.image_source).name, "height": h, "width": w,
                       "image_key": annotation.image_key, "path": annotation.image_source})
        for obj in object_masks(annotation):
            full = np.zeros((h, w), np.uint8, order="F")
            oy, ox = obj.offset_yx
            full[oy : oy + obj.mask.shape[0], ox : ox + obj.mask.shape[1]] = obj.mask
            rle = mask_utils.encode(full)
            record = obj.record
            unclassified_used |= record.class_name is None
            coco_annotations.append({
                "id": len(coco_annotations) + 1,
                "image_id": image_id,
                "category_id": category_ids.get(record.class_name, len(categories) + 1),
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": obj.bbox_xywh,
                "iscrowd": 0,
                "score": record.score,
                "hrmedseg": {"object_id": record.id, "model": record.model, "edited": record.edited},
            })
    if unclassified_used:
        categories.append({"id": len(categories) + 1, "name": UNCLASSIFIED, "supercategory": "object"})
    return {
        "info": {"description": "hrmedseg annotations", "version": "1.0"},
        "images": images,
        "annotations": coco_annotations,
        "categories": categories,
    }


def write_coco(path: Path, annotations: Sequence[ImageAnnotation], classes: Sequence[ObjectClass]) -> None:
    """Write ``to_coco`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_coco(annotations, classes), f)


@dataclass
class CocoImage:
    """One image of a COCO file, read for import: where it is, its size, its objects."""

    key: str
    source: str
    shape_yx: tuple[int, int]
    objects: list[ImportedObject]


def read_coco(path: Path) -> tuple[list[CocoImage], dict[str, tuple[int, int, int] | None]]:
    """The images of a COCO file (loaded by pycocotools itself) and the classes its categories name.

    Segmentations may be RLE (compressed or not) or polygons: pycocotools rasterises them all.
    """
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            coco = COCO(str(path))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise InputError(f"{path} is not a COCO annotation file pycocotools can load ({err!r})") from err
    categories = {c["id"]: c for c in coco.loadCats(coco.getCatIds())}
    classes = {
        c["name"]: tuple(c["color"]) if isinstance(c.get("color"), list) and len(c["color"]) == 3 else None
        for c in categories.values() if c["name"] != UNCLASSIFIED
    }
    images = []
    for info in coco.loadImgs(coco.getImgIds()):
        what = f"{path}, image {info.get('id')}"
        try:
            shape = (int(info["height"]), int(info["width"]))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{what}: no integer height and width") from err
        objects = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]])):
            try:
                mask = coco.annToMask(ann).astype(bool)
            except Exception as err:  # noqa: BLE001 - pycocotools raises bare errors for bad segmentations
                raise InputError(f"{what}, annotation {ann.get('id')}: unreadable segmentation ({err!r})") from err
            if mask.shape != shape:
                raise InputError(f"{what}, annotation {ann.get('id')}: mask of size {mask.shape}, image {shape}")
            rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
            if not len(rows):
                continue
            window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            category = categories.get(ann.get("category_id"), {})
            own = ann.get("hrmedseg") if isinstance(ann.get("hrmedseg"), dict) else {}
            objects.append(ImportedObject(
                mask=mask[window], offset_yx=(int(rows[0]), int(cols[0])),
                class_name=None if category.get("name") in (None, UNCLASSIFIED) else category["name"],
                object_id=own.get("object_id") if isinstance(own.get("object_id"), int) else None,
                score=ann.get("score") if isinstance(ann.get("score"), (int, float)) else None,
                model=own.get("model") if isinstance(own.get("model"), dict) else {},
                edited=bool(own.get("edited", True)),
            ))
        file_name = str(info.get("file_name") or f"image_{info['id']}")
        key = info.get("image_key") or image_key_for(file_name)
        source = info.get("path") or str(path.parent / file_name)
        images.append(CocoImage(str(key), str(source), shape, objects))
    return images, classes
