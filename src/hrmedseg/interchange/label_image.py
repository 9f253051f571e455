"""Plain label images (TIFF, PNG): 0 = background, k = object k, as Fiji, napari and most tools write them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..io import write_label_tiff
from ..store import ImageAnnotation, ObjectClass
from .objects import ImportedObject, labels_2d


def write_labels(path: Path, annotations: Sequence[ImageAnnotation], classes: Sequence[ObjectClass]) -> None:
    """The label image of one annotation as a tiled, compressed TIFF (``hrmedseg.io.write_label_tiff``)."""
    (annotation,) = annotations
    write_label_tiff(path, labels_2d(annotation))


def read_label_image(path: Path) -> np.ndarray:
    """A (H, W) integer label image from a TIFF or any format Pillow reads; InputError naming the file otherwise."""
    from ..io.readers import decode_with_pillow

    if path.suffix.lower() in (".tif", ".tiff"):
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


def label_objects(labels: np.ndarray) -> list[ImportedObject]:
    """One object per non-zero value, keeping the value as its id."""
    from scipy.ndimage import find_objects

    return [
        ImportedObject(mask=labels[w] == i + 1, offset_yx=(w[0].start, w[1].start), object_id=i + 1)
        for i, w in enumerate(find_objects(labels))
        if w is not None
    ]
