"""Label images: 0 = background, k = object k, as Fiji, napari and most tools write them.

Plain TIFF / PNG files, and OME-Zarr (NGFF) labels groups: ``<key>.ome.zarr`` holds the
``labels`` group of the NGFF spec, with one multiscale label image in it::

    <key>.ome.zarr/             labels: ["annotations"]  (copy it into an image's .ome.zarr as labels/)
        annotations/            multiscales + image-label (colours and properties per object)
            0/ 1/ ...           the pyramid (hrmedseg.io.write_label_image)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_dir
from ..errors import InputError
from ..io import write_label_image, write_label_tiff
from ..store import ImageAnnotation, ObjectClass, objects_from_labels
from .objects import ImportedObject, labels_2d, provenance

NGFF_LABEL_NAME = "annotations"
UNCLASSIFIED_RGBA = (128, 128, 128, 255)  # grey, when other objects have class colours


def write_labels(path: Path, annotations: Sequence[ImageAnnotation], classes: Sequence[ObjectClass]) -> None:
    """The label image of one annotation as a tiled, compressed TIFF (``hrmedseg.io.write_label_tiff``)."""
    (annotation,) = annotations
    write_label_tiff(path, labels_2d(annotation))


def write_ngff_labels(
    path: Path, annotations: Sequence[ImageAnnotation], classes: Sequence[ObjectClass], version: str = "0.5"
) -> None:
    """The label image of one annotation as an OME-Zarr labels group (NGFF ``version``), atomically.

    Each object's colour is its class's (unclassified ones grey; no colours at all when no object
    has a class, so readers choose theirs); ``image-label.properties`` give each label value its
    ``class`` and provenance (``object_id``, ``score``, ``model``, ``edited``).
    """
    import zarr
    from ome_zarr.writer import add_metadata

    from ..io.ome_zarr import ngff_format

    (annotation,) = annotations
    labels = labels_2d(annotation)
    records = objects_from_labels(labels, annotation.objects)
    class_rgba = {c.name: (*c.color, 255) for c in classes}
    colors = None
    if any(r.class_name for r in records):
        colors = {r.id: class_rgba[r.class_name] if r.class_name else UNCLASSIFIED_RGBA for r in records}
    properties = [{"label-value": r.id, "class": r.class_name, **provenance(r)} for r in records]
    fmt = ngff_format(version)
    with atomic_dir(path) as tmp:
        write_label_image(tmp / NGFF_LABEL_NAME, labels, colors=colors, properties=properties, version=version,
                          name=annotation.image_key)
        group = zarr.open_group(str(tmp), mode="a", zarr_format=fmt.zarr_format)  # the label image is already in it
        add_metadata(group, {"labels": [NGFF_LABEL_NAME], **({"version": fmt.version} if version == "0.5" else {})}, fmt=fmt)


def _ngff_label_path(path: Path) -> tuple[Path, dict]:
    """(the label image, its attributes) of an OME-Zarr: a labels group's first one, or the image itself."""
    import zarr

    def attributes(group_path: Path) -> dict:
        try:
            return dict(zarr.open_group(str(group_path), mode="r").attrs)
        except Exception as err:  # zarr raises many kinds for a folder that is no zarr group
            raise InputError(f"cannot open {group_path} as an OME-Zarr: {type(err).__name__}: {str(err)[:200]}") from err

    attrs = attributes(path)
    names = attrs.get("labels") or (attrs.get("ome") or {}).get("labels")
    if names:
        path = path / names[0]
        attrs = attributes(path)
    return path, attrs


def ngff_label_properties(path: Path) -> tuple[dict[int, dict], dict[str, tuple[int, int, int] | None]]:
    """What an OME-Zarr label image says of its objects, as ``write_ngff_labels`` writes it.

    Returns ``{label value: properties}`` from ``image-label.properties`` (NGFF 0.4 or 0.5) and the
    classes they name (``class``), with the colour of the class's first object from
    ``image-label.colors``. Files without them give empty dicts.
    """
    _, attrs = _ngff_label_path(path)
    image_label = attrs.get("image-label") or (attrs.get("ome") or {}).get("image-label") or {}

    def by_value(entries: object) -> dict[int, dict]:
        return {e["label-value"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("label-value"), int)} \
            if isinstance(entries, list) else {}

    properties, colors = by_value(image_label.get("properties")), by_value(image_label.get("colors"))
    classes: dict[str, tuple[int, int, int] | None] = {}
    for value, entry in properties.items():
        name = entry.get("class")
        if isinstance(name, str) and name and name not in classes:
            rgba = colors.get(value, {}).get("rgba")
            ok = isinstance(rgba, list) and len(rgba) >= 3 and all(isinstance(v, int) for v in rgba[:3])
            classes[name] = tuple(rgba[:3]) if ok else None
    return properties, classes


def _ngff_label_image(path: Path) -> np.ndarray:
    """Full resolution of an OME-Zarr label image: a labels group's first one, or a label image itself."""
    from ..io import open_ome_zarr

    path, _ = _ngff_label_path(path)
    image = open_ome_zarr(path)
    if image.n_channels != 1:
        raise InputError(f"{path} is not a label image: it has {image.n_channels} channels")
    h, w = image.shape_yx
    return image.read(0, h, 0, w)[..., 0]


def read_label_image(path: Path) -> np.ndarray:
    """A (H, W) integer label image from a TIFF, an OME-Zarr labels group or label image, or any
    format Pillow reads; InputError naming the file otherwise."""
    from ..io.readers import decode_with_pillow

    if path.is_dir():
        labels = _ngff_label_image(path)
    elif path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            labels = tifffile.imread(path)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read label image {path}: {err}") from err
    else:
        labels = decode_with_pillow(path)
    labels = np.squeeze(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise InputError(f"{path} is not a label image: need (H, W) integers, got {labels.dtype} {labels.shape}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise InputError(f"{path} is not a label image: it has negative values")
    return labels


def label_objects(labels: np.ndarray, properties: dict[int, dict] | None = None) -> list[ImportedObject]:
    """One object per non-zero value, keeping the value as its id; ``properties`` (per value, from
    :func:`ngff_label_properties`) give its class, score, model and edited flag."""
    from scipy.ndimage import find_objects

    objects = []
    for i, w in enumerate(find_objects(labels)):
        if w is None:
            continue
        p = (properties or {}).get(i + 1, {})
        score, model, name = p.get("score"), p.get("model"), p.get("class")
        objects.append(ImportedObject(
            mask=labels[w] == i + 1, offset_yx=(w[0].start, w[1].start), object_id=i + 1,
            class_name=name if isinstance(name, str) and name else None,
            score=score if isinstance(score, (int, float)) and not isinstance(score, bool) else None,
            model={"name": model} if isinstance(model, str) else {},
            edited=p.get("edited") if isinstance(p.get("edited"), bool) else True,
        ))
    return objects
