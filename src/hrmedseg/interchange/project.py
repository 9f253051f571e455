"""Export a project's annotations to other tools' files, and import theirs into a project.

Formats are a table (:data:`EXPORT_FORMATS`) of writer functions ``write(path, annotations,
classes)``, each atomic: add a format by adding a row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import InputError
from ..store import AnnotationStore, ImageAnnotation, ObjectClass, image_key_for
from . import coco, geojson, label_image
from .objects import ImportedObject, paint_objects

Writer = Callable[[Path, Sequence[ImageAnnotation], Sequence[ObjectClass]], None]


@dataclass(frozen=True)
class ExportFormat:
    """A file format annotations can be exported to.

    ``per_image``: one file per image (else one file holds them all); ``suffix``: of each file.
    """

    name: str
    suffix: str
    per_image: bool
    write: Writer
    description: str


EXPORT_FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("geojson", ".geojson", True, lambda p, a, c: geojson.write_geojson(p, a[0], c),
                     "QuPath GeoJSON: one Feature per object"),
        ExportFormat("coco", ".json", False, coco.write_coco, "COCO instance JSON with RLE masks"),
        ExportFormat("tiff", ".tif", True, label_image.write_labels, "label image, tiled compressed TIFF"),
        ExportFormat("ome-zarr", ".ome.zarr", True, label_image.write_ngff_labels,
                     "OME-Zarr (NGFF 0.5) labels group: multiscale label image, class colours"),
    )
}


def export_annotations(
    store: AnnotationStore, format: str, out: str | os.PathLike | None = None, image_keys: Sequence[str] | None = None
) -> list[Path]:
    """Write the images ``image_keys`` (default: all) of ``store`` in ``format``; the files written.

    ``out`` is a file when it ends with the format's suffix (one file must result), else a
    folder (created); default ``<project>/exports/``. Files are named ``<image key><suffix>``,
    or ``annotations<suffix>`` for formats holding all images in one file.
    """
    if format not in EXPORT_FORMATS:
        raise InputError(f"unknown export format '{format}' (choose from: {', '.join(EXPORT_FORMATS)})")
    fmt = EXPORT_FORMATS[format]
    keys = list(image_keys) if image_keys else store.image_keys()
    if not keys:
        raise InputError(f"the annotation store {store.path} holds no annotated images to export")
    annotations = [store.load(k) for k in keys]  # names a missing key before anything is written
    classes = store.classes()
    out = Path(out) if out is not None else store.path / "exports"
    as_file = out.name.lower().endswith(fmt.suffix)
    if as_file and fmt.per_image and len(keys) > 1:
        raise InputError(f"{out}: {len(keys)} images give {len(keys)} {format} files; give a folder or --image KEY")
    if fmt.per_image:
        targets = [(out if as_file else out / f"{a.image_key}{fmt.suffix}", [a]) for a in annotations]
    else:
        targets = [(out if as_file else out / f"annotations{fmt.suffix}", annotations)]
    for path, group in targets:
        fmt.write(path, group, classes)
    return [path for path, _ in targets]


def import_annotations(
    store: AnnotationStore,
    file: str | os.PathLike,
    image_key: str | None = None,
    image_source: str | os.PathLike | None = None,
) -> list[str]:
    """Import a GeoJSON, COCO or label image (TIFF, PNG, OME-Zarr) file into ``store``; the keys of the images saved.

    Each imported image's annotation is replaced by the file's objects (the file is taken to be
    that image's whole annotation, as QuPath exports it). ``image_key`` names the store image
    (default: the COCO image's key, or the file's stem); ``image_source`` is the image file, needed
    for an image the store does not have yet (GeoJSON and label images carry no image size or path).
    Classes the file names are added to the store's classes.
    """
    file = Path(file)
    if not (file.is_file() or (file.is_dir() and file.name.lower().endswith(".zarr"))):
        raise InputError(f"file to import not found: {file}")
    kind = _import_kind(file)
    if kind == "coco":
        images, classes = coco.read_coco(file)
        if image_key is not None:
            if len(images) == 1:
                images[0].key = image_key
            images = [im for im in images if im.key == image_key]
            if not images:
                raise InputError(f"{file} has no image with key '{image_key}'")
        jobs = [(im.key, _source(store, im.key, image_source if len(images) == 1 else None, im.source),
                 im.shape_yx, im.objects) for im in images]
    else:
        key = image_key or _key_from_file(store, file)
        source = _source(store, key, image_source, None)
        if kind == "labels":
            labels = label_image.read_label_image(file)
            # an OME-Zarr (ours, or one that follows NGFF image-label) may say each object's class
            properties, classes = label_image.ngff_label_properties(file) if file.is_dir() else ({}, {})
            shape, objects = labels.shape, label_image.label_objects(labels, properties)
        else:
            shape = _shape(store, key, source)
            data = _read_json(file)
            objects, classes = geojson.read_features(data, shape, str(file))
        jobs = [(key, source, tuple(shape), objects)]
    for key, _, shape, _ in jobs:  # every check before the first write: no half-imported file
        _check_shape(store, key, shape, file)
    for name, color in classes.items():
        store.add_class(name, color)
    for key, source, shape, objects in jobs:
        labels, records = paint_objects(shape, objects, file.name)
        store.save(ImageAnnotation(image_key=key, image_source=source, labels=labels, objects=records))
    return [key for key, *_ in jobs]


def _import_kind(file: Path) -> str:
    suffix = file.suffix.lower()
    if suffix in (".tif", ".tiff", ".png", ".zarr"):
        return "labels"
    if suffix == ".geojson":
        return "geojson"
    if suffix == ".json":
        data = _read_json(file)
        return "coco" if isinstance(data, dict) and "images" in data and "annotations" in data else "geojson"
    raise InputError(
        f"{file}: cannot tell its format; import takes .geojson, COCO .json, or a .tif/.png/.ome.zarr label image"
    )


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {file} as JSON: {err}") from err


def _key_from_file(store: AnnotationStore, file: Path) -> str:
    """The store image a file belongs to: exported files are named after their image key."""
    stem = file.name.split(".")[0]
    return stem if stem in store else image_key_for(file)


def _source(store: AnnotationStore, key: str, given: str | os.PathLike | None, fallback: str | None) -> str:
    if given is not None:
        return str(given)
    if key in store:
        return store.load(key).image_source
    if fallback is not None:
        return fallback
    raise InputError(f"image '{key}' is not in the annotation store {store.path}: give its image file (--source)")


def _shape(store: AnnotationStore, key: str, source: str) -> tuple[int, int]:
    if key in store:
        return tuple(store.load(key).labels.shape[-2:])  # type: ignore[return-value]
    from ..io import open_image

    return tuple(open_image(source).shape_yx)  # type: ignore[return-value]


def _check_shape(store: AnnotationStore, key: str, shape: tuple[int, int], file: Path) -> None:
    if key in store:
        have = store.load(key).labels.shape
        if tuple(have) != tuple(shape):
            raise InputError(f"{file}: image '{key}' is {shape[0]} x {shape[1]} there, {have} in the store")
