"""One image's results, written as a whole or not at all.

``<out>/<key>/`` holds ``labels.ome.zarr`` (or ``labels.tif`` with ``--format tiff``) and
``annotations.json`` in the annotation store's per-image format (``hrmedseg.store``). The
folder is written under a temporary name and renamed into place (:func:`hrmedseg.atomic.atomic_dir`),
so an interrupted run leaves complete images and nothing else.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_dir
from ..store import IMAGE_FORMAT, STORE_VERSION, now_iso
from .inputs import ImageJob

LABELS_FILES = {"ome-zarr": "labels.ome.zarr", "tiff": "labels.tif"}
ANNOTATIONS_FILE = "annotations.json"


def write_image_outputs(
    out: Path, job: ImageJob, labels: Any, records: Sequence[Any], output_format: str, max_id: int,
    class_names: Sequence[str] | None = None,
) -> float:
    """Write ``labels`` ((H, W) array or SparseLabels) and ``records`` (store ObjectRecords); returns seconds."""
    from ..io import label_dtype, write_label_image, write_label_tiff
    from ..io.writers import label_source

    shape, _, _ = label_source(labels, max_id=max_id)
    t0 = time.perf_counter()
    with atomic_dir(out / job.key) as tmp:
        labels_file = LABELS_FILES[output_format]
        if output_format == "ome-zarr":
            write_label_image(tmp / labels_file, labels, max_id=max_id)
        else:
            write_label_tiff(tmp / labels_file, labels, max_id=max_id)
        meta = {
            "format": IMAGE_FORMAT,
            "version": STORE_VERSION,
            "image_key": job.key,
            "image_source": job.image,
            "shape": list(shape),
            "dtype": str(label_dtype(max_id)),
            "layer_name": job.key,
            "labels_file": labels_file,
            "labels_sha256": None,  # a folder (OME-Zarr) has no single digest; the manifest records the model's
            "modified": now_iso(),
            "objects": [r.to_dict() for r in records],
        }
        if class_names is not None:
            meta["class_names"] = list(class_names)
        # Streamed: a slide's 170k objects as one string (and its pieces) took 700 MiB more at the peak.
        with open(tmp / ANNOTATIONS_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return time.perf_counter() - t0
