"""Which images a batch run segments: files, folders, globs, or a CSV listing them.

A CSV input has a header with an ``image`` (or ``path``) column and optional ``boxes`` and
``points`` columns naming prompt files; relative paths are relative to the CSV's folder.
Boxes files are read as ``hrmedseg segment --boxes`` reads them (:func:`hrmedseg.io.read_boxes`).
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from ..store import image_key_for

IMAGE_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".svs", ".ndpi", ".png", ".jpg", ".jpeg", ".zarr", ".ome.zarr")
BOX_SUFFIXES = (".boxes.csv", ".csv", ".json", ".geojson")


@dataclass(frozen=True)
class ImageJob:
    """One image of a run: where it is, its prompt files, and ``key``, its output folder's name."""

    image: str
    key: str
    boxes: str | None = None
    points: str | None = None


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _from_csv(path: Path) -> list[tuple[str, str | None, str | None]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError(f"image list {path} has no rows")
    columns = {c.strip().lower(): c for c in rows[0]}
    image_col = columns.get("image") or columns.get("path")
    if image_col is None:
        raise InputError(f"image list {path}: no 'image' (or 'path') column; columns are {list(rows[0])}")

    def resolve(value: str | None) -> str | None:
        value = (value or "").strip()
        return None if not value else str(path.parent / value) if not os.path.isabs(value) else value

    out = []
    for row in rows:
        image = resolve(row[image_col])
        if image is None:
            raise InputError(f"image list {path}: a row has an empty '{image_col}'")
        out.append((image, resolve(row.get(columns.get("boxes", ""))), resolve(row.get(columns.get("points", "")))))
    return out


def _box_file_for(boxes: Path, key: str) -> str | None:
    """The box file of image ``key``: ``boxes`` itself, or ``boxes/<key><suffix>`` in a folder."""
    if not boxes.is_dir():
        return str(boxes)
    for suffix in BOX_SUFFIXES:
        if (boxes / f"{key}{suffix}").is_file():
            return str(boxes / f"{key}{suffix}")
    return None


def expand_inputs(inputs: Iterable[str | os.PathLike], boxes: str | os.PathLike | None = None) -> list[ImageJob]:
    """The images named by ``inputs`` (files, folders, glob patterns, CSV lists), in a stable order.

    ``boxes``: one box file for every image, or a folder holding ``<key>.boxes.csv`` (or .csv,
    .json, .geojson) per image; a CSV list's ``boxes`` column takes precedence. Keys are the
    images' file stems, made unique with ``_2``, ``_3`` ... in input order.
    """
    found: list[tuple[str, str | None, str | None]] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            if not matches:
                raise InputError(f"input pattern {text} matches no file")
            found += [(str(p), None, None) for p in matches if _is_image(p)]
        elif path.is_dir() and not path.name.lower().endswith(".zarr"):
            images = sorted(p for p in path.iterdir() if _is_image(p))
            if not images:
                raise InputError(f"input folder {path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            found += [(str(p), None, None) for p in images]
        elif path.suffix.lower() == ".csv" and path.is_file():
            found += _from_csv(path)
        elif path.exists():
            found.append((text, None, None))
        else:
            raise InputError(f"input not found: {text}")
    if boxes is not None and not Path(boxes).exists():
        raise InputError(f"--boxes {boxes}: no such file or folder")
    jobs: list[ImageJob] = []
    seen: dict[str, int] = {}
    for image, box_file, points in found:
        key = image_key_for(image)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            key = f"{key}_{seen[key]}"
        if box_file is None and boxes is not None:
            box_file = _box_file_for(Path(boxes), image_key_for(image))
        jobs.append(ImageJob(image=image, key=key, boxes=box_file, points=points))
    if not jobs:
        raise InputError("no input images")
    return jobs


def absolute_path(path: str | None) -> str | None:
    """``path`` made absolute against this process's working folder; URIs (``s3://...``) as they are."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(path)


def absolute_model_spec(spec: str) -> str:
    """A weights file's path made absolute; a registry name (no such file here) as it is."""
    path = os.path.expanduser(spec)
    return os.path.abspath(path) if os.path.isfile(path) else spec


def with_absolute_paths(jobs: Iterable[ImageJob]) -> list[ImageJob]:
    """``jobs`` with absolute image and prompt paths, for workers of a remote cluster.

    A remote worker runs in its own working folder, so ``slides/a.tif`` typed here would be
    looked for there; the user meant the one beside them (on the shared file system).
    """
    return [replace(j, image=absolute_path(j.image), boxes=absolute_path(j.boxes), points=absolute_path(j.points))
            for j in jobs]
