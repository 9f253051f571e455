"""The annotation store: a project folder of label images, boxes and per-object provenance.

Layout (format "hrmedseg-annotations", version 1)::

    <project>/project.json               {"format", "version", "classes": [{name, color}],
                                          "images": [{key, labels, annotations,
                                            labels_sha256, annotations_sha256, revision, modified}]}
    <project>/labels/<image_key>.tif      label image (0 = background, k = object k), zlib-compressed
    <project>/annotations/<image_key>.json
        {"format": "hrmedseg-annotations/image", "version": 1, "image_key", "image_source",
         "shape", "layer_name", "labels_file", "labels_sha256", "modified",
         "objects": [{id, box_xyxy, prompt: {"type": "box", ...}, model: {name, sha256 | path},
                      score, edited, class, created, modified}]}

Object classes (``classes`` in project.json, ``class`` of an object: a class name or null) were
added within version 1: stores written before them load with no classes and unclassified objects.

An object's ``prompt`` (:func:`object_prompt`) is {"type": "box" | "box+points" | "points" |
"paint", "box_xyxy": [...], "points": [[x, y], ...], "point_labels": [1, 0, ...], "slice": [...]}:
everything the model was given, so a commit can be re-run exactly (:func:`prompt_points` reads
the clicks back; prompts saved before clicks existed simply have none).

Crash safety: a save writes both files of an image under temporary names, moves the current
files aside (``*.prev.*``), moves the new ones in, and only then replaces ``project.json``, which
records the sha256 of the files it belongs to. A reader takes, for each file, the current or the
``.prev`` copy whose checksum ``project.json`` names, so a save killed at any step leaves the
previous state readable; the ``.prev`` copies are deleted once ``project.json`` is written.

No Qt, no napari, no torch: the training code and the plugin both read stores through this API.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import atomic_path, remove_stale_temps, stage_file
from .errors import InputError
from .hashing import sha256_file

STORE_FORMAT = "hrmedseg-annotations"
STORE_VERSION = 1
IMAGE_FORMAT = "hrmedseg-annotations/image"
PROJECT_FILE = "project.json"

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def now_iso() -> str:
    """UTC time stamp as written in the store, e.g. '2025-01-31T12:00:00+00:00'."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def image_key_for(source: str | os.PathLike) -> str:
    """A valid image key from a path or URI (its file stem with other characters turned into '_')."""
    stem = Path(str(source).rstrip("/")).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(stem).stem or stem
    key = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")[:128]
    return key or "image"


def _check_key(image_key: str) -> str:
    if not isinstance(image_key, str) or not _KEY_RE.match(image_key) or image_key.endswith(".prev"):
        raise InputError(
            f"invalid image key {image_key!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (hrmedseg.store.image_key_for(path) makes one)"
        )
    return image_key


# Colours given to new classes in turn (matplotlib's tab10): distinct, and readable on images.
CLASS_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


@dataclass(frozen=True)
class ObjectClass:
    """A class objects can belong to: its name and its display colour (R, G, B, 0-255)."""

    name: str
    color: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "color": [int(c) for c in self.color]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ObjectClass":
        return cls(name=str(d["name"]), color=_check_color(d.get("color"), str(d["name"])))


def new_class(name: str, existing: Sequence[ObjectClass], color: Sequence[int] | None = None) -> ObjectClass:
    """A class called ``name`` (stripped, not empty): ``color``, or the palette's next colour after ``existing``."""
    name = str(name).strip()
    if not name:
        raise InputError("a class name must not be empty")
    rgb = _check_color(color, name) if color is not None else CLASS_PALETTE[len(existing) % len(CLASS_PALETTE)]
    return ObjectClass(name, rgb)


def _check_color(color: Any, name: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(c) for c in color)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise InputError(f"class '{name}': colour {color!r} is not three integers 0-255 (R, G, B)")
    return rgb  # type: ignore[return-value]


def object_prompt(
    box: Sequence[float] | None,
    points: Sequence[Sequence[float]] = (),
    point_labels: Sequence[int] = (),
    slice_index: Sequence[int] = (),
) -> dict[str, Any]:
    """An object's ``prompt`` record: its box and clicks (x, y, full-resolution px; labels 1 / 0)."""
    kind = "+".join(k for k, present in (("box", box is not None), ("points", len(points) > 0)) if present)
    prompt: dict[str, Any] = {"type": kind or "paint"}
    if box is not None:
        prompt["box_xyxy"] = [float(v) for v in box]
    if len(points):
        prompt["points"] = [[float(x), float(y)] for x, y in points]
        prompt["point_labels"] = [int(v) for v in point_labels]
    if len(slice_index):
        prompt["slice"] = [int(v) for v in slice_index]
    return prompt


def prompt_points(prompt: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The clicks of a ``prompt`` record: ((P, 2) float64 xy, (P,) int64 labels); P = 0 for none."""
    xy = np.asarray(prompt.get("points") or [], np.float64).reshape(-1, 2)
    labels = np.asarray(prompt.get("point_labels") or [1] * len(xy), np.int64).reshape(-1)
    if len(labels) != len(xy):
        raise InputError(f"prompt has {len(xy)} points but {len(labels)} point labels")
    return xy, labels


@dataclass
class ObjectRecord:
    """One object of a label image: its id, the box that prompted it and the model that made it.

    ``box_xyxy`` is (x0, y0, x1, y1) in pixels of the full-resolution image plane (None for
    objects painted by hand); ``prompt`` is :func:`object_prompt`'s record (box, clicks and,
    for nD images, "slice": the indices of the leading axes); ``model`` is {"name": ..., "sha256": ...}
    or {"name": ..., "path": ...}; ``edited`` says a person changed the mask after the model;
    ``class_name`` names one of the store's classes (None: unclassified).
    """

    id: int
    box_xyxy: tuple[float, float, float, float] | None = None
    prompt: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    edited: bool = False
    class_name: str | None = None
    created: str = field(default_factory=now_iso)
    modified: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": int(self.id),
            "box_xyxy": None if self.box_xyxy is None else [float(v) for v in self.box_xyxy],
            "prompt": self.prompt,
            "model": self.model,
            "score": None if self.score is None else float(self.score),
            "edited": bool(self.edited),
            "class": self.class_name,
            "created": self.created,
            "modified": self.modified,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ObjectRecord":
        box = d.get("box_xyxy")
        return cls(
            id=int(d["id"]),
            box_xyxy=None if box is None else tuple(float(v) for v in box),  # type: ignore[arg-type]
            prompt=dict(d.get("prompt") or {}),
            model=dict(d.get("model") or {}),
            score=d.get("score"),
            edited=bool(d.get("edited", False)),
            class_name=d.get("class"),
            created=d.get("created") or now_iso(),
            modified=d.get("modified") or now_iso(),
        )


@dataclass
class ImageAnnotation:
    """The annotation of one image: its label image (numpy, any integer dtype) and its objects."""

    image_key: str
    image_source: str
    labels: np.ndarray
    objects: list[ObjectRecord] = field(default_factory=list)
    layer_name: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.labels.shape)

    def object(self, object_id: int) -> ObjectRecord:
        for obj in self.objects:
            if obj.id == object_id:
                return obj
        raise KeyError(f"image '{self.image_key}' has no object {object_id}")


class AnnotationStore:
    """A project folder of annotations; ``create`` or ``open`` it, then ``save`` / ``load`` images."""

    def __init__(self, path: Path, project: dict[str, Any]) -> None:
        self.path = path
        self._project = project

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, exist_ok: bool = True) -> "AnnotationStore":
        """Make a new, empty store at ``path`` (an existing store there is opened when exist_ok)."""
        path = Path(path)
        if (path / PROJECT_FILE).exists():
            if not exist_ok:
                raise InputError(f"an annotation store already exists at {path}")
            return cls.open(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"cannot create an annotation store at {path}: it is a file")
        path.mkdir(parents=True, exist_ok=True)
        project = {"format": STORE_FORMAT, "version": STORE_VERSION, "created": now_iso(), "classes": [],
                   "images": []}
        store = cls(path, project)
        store._write_project()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> "AnnotationStore":
        """Open an existing store; InputError naming ``path`` when it is not one."""
        path = Path(path)
        project_file = path / PROJECT_FILE
        if not project_file.is_file():
            raise InputError(f"{path} is not an hrmedseg annotation store (no {PROJECT_FILE})")
        try:
            project = json.loads(project_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read {project_file}: {err}") from err
        if not isinstance(project, dict) or project.get("format") != STORE_FORMAT:
            raise InputError(f"{project_file} is not an hrmedseg annotation store (format is not '{STORE_FORMAT}')")
        if int(project.get("version", 0)) > STORE_VERSION:
            raise InputError(
                f"{project_file} has store version {project['version']}; this hrmedseg reads up to "
                f"{STORE_VERSION}: update hrmedseg"
            )
        project.setdefault("images", [])
        project.setdefault("classes", [])
        store = cls(path, project)
        store.remove_stale_temps()
        return store

    @staticmethod
    def is_store(path: str | os.PathLike) -> bool:
        return (Path(path) / PROJECT_FILE).is_file()

    def remove_stale_temps(self) -> list[Path]:
        """Delete temporary files left by saves that were killed (see :mod:`hrmedseg.atomic`)."""
        return [p for folder in (self.path, self.path / "labels", self.path / "annotations") for p in remove_stale_temps(folder)]

    # -- reading ----------------------------------------------------------------------------
    def image_keys(self) -> list[str]:
        """Keys of the images saved so far, in the order they were first saved."""
        return [entry["key"] for entry in self._project["images"]]

    def __contains__(self, image_key: str) -> bool:
        return image_key in self.image_keys()

    def _entry(self, image_key: str) -> dict[str, Any]:
        for entry in self._project["images"]:
            if entry["key"] == image_key:
                return entry
        raise InputError(
            f"image '{image_key}' is not in the annotation store {self.path} "
            f"(it has: {', '.join(self.image_keys()) or 'no images'})"
        )

    def _verified(self, relative: str, sha256: str) -> Path:
        """The current file, or its ``.prev`` copy left by an interrupted save, whose checksum is ``sha256``."""
        current = self.path / relative
        candidates = [current, _prev_path(current)]
        for candidate in candidates:
            if candidate.is_file() and sha256_file(candidate) == sha256:
                return candidate
        raise InputError(
            f"annotation store {self.path}: {relative} is missing or does not match project.json "
            f"(sha256 {sha256[:12]}...); the store was changed outside hrmedseg"
        )

    def load(self, image_key: str) -> ImageAnnotation:
        """The saved annotation of ``image_key``, labels as a numpy array."""
        import tifffile

        entry = self._entry(image_key)
        ann_path = self._verified(entry["annotations"], entry["annotations_sha256"])
        labels_path = self._verified(entry["labels"], entry["labels_sha256"])
        meta = json.loads(ann_path.read_text(encoding="utf-8"))
        labels = tifffile.imread(labels_path)
        if list(labels.shape) != list(meta["shape"]):
            raise InputError(f"{labels_path}: labels of shape {labels.shape}, {ann_path} says {meta['shape']}")
        return ImageAnnotation(
            image_key=image_key,
            image_source=meta["image_source"],
            labels=labels,
            objects=[ObjectRecord.from_dict(o) for o in meta.get("objects", [])],
            layer_name=meta.get("layer_name"),
        )

    def find_source(self, image_source: str) -> str | None:
        """The key of the image saved from ``image_source``, if any."""
        for key in self.image_keys():
            entry = self._entry(key)
            if entry.get("image_source") == str(image_source):
                return key
        return None

    # -- classes ----------------------------------------------------------------------------
    def classes(self) -> list[ObjectClass]:
        """The store's object classes, in the order they were added (index + 1 = class index)."""
        return [ObjectClass.from_dict(d) for d in self._project.get("classes", [])]

    def get_class(self, name: str) -> ObjectClass:
        for cls in self.classes():
            if cls.name == name:
                return cls
        raise InputError(
            f"class '{name}' is not in the annotation store {self.path} "
            f"(it has: {', '.join(c.name for c in self.classes()) or 'no classes'})"
        )

    def add_class(self, name: str, color: Sequence[int] | None = None) -> ObjectClass:
        """Add a class (a palette colour unless ``color`` is given); an existing one is returned as it is."""
        existing = self.classes()
        cls = new_class(name, existing, color)
        for known in existing:
            if known.name == cls.name:
                return known
        self._project.setdefault("classes", []).append(cls.to_dict())
        self._write_project()
        return cls

    # -- writing ----------------------------------------------------------------------------
    def save(self, annotation: ImageAnnotation) -> None:
        """Save (add or replace) one image's annotation; crash-safe, see the module docstring."""
        import tifffile

        key = _check_key(annotation.image_key)
        labels = np.asarray(annotation.labels)
        if labels.dtype.kind not in "ui":
            raise InputError(f"labels of image '{key}' must be integers, not {labels.dtype}")
        ids = {o.id for o in annotation.objects}
        if len(ids) != len(annotation.objects):
            raise InputError(f"image '{key}': two objects share an id")
        known = {c.name for c in self.classes()}
        for obj in annotation.objects:
            if obj.class_name is not None and obj.class_name not in known:
                raise InputError(f"image '{key}', object {obj.id}: class '{obj.class_name}' is not in the store "
                                 "(add it with AnnotationStore.add_class first)")
        labels_rel = f"labels/{key}.tif"
        ann_rel = f"annotations/{key}.json"
        labels_path = self.path / labels_rel
        ann_path = self.path / ann_rel
        labels_path.parent.mkdir(exist_ok=True)
        ann_path.parent.mkdir(exist_ok=True)

        staged: list[tuple[Path, Path]] = []  # (temporary file, final path)
        try:
            staged.append((stage_file(labels_path, lambda tmp: _write_labels(tifffile, tmp, labels)), labels_path))
            labels_sha = sha256_file(staged[0][0])
            meta = {
                "format": IMAGE_FORMAT,
                "version": STORE_VERSION,
                "image_key": key,
                "image_source": str(annotation.image_source),
                "shape": list(labels.shape),
                "dtype": str(labels.dtype),
                "layer_name": annotation.layer_name,
                "labels_file": labels_rel,
                "labels_sha256": labels_sha,
                "modified": now_iso(),
                "objects": [o.to_dict() for o in sorted(annotation.objects, key=lambda o: o.id)],
            }
            text = json.dumps(meta, indent=1)
            staged.append((stage_file(ann_path, lambda tmp: tmp.write_text(text, encoding="utf-8")), ann_path))
            ann_sha = sha256_file(staged[1][0])
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise

        # Keep the files project.json vouches for as *.prev until project.json moves on. After an
        # earlier interrupted save the vouched-for copy may already be the .prev one: keep it then.
        old_entry = next((e for e in self._project["images"] if e["key"] == key), None)
        vouched = {
            labels_path: old_entry and old_entry["labels_sha256"],
            ann_path: old_entry and old_entry["annotations_sha256"],
        }
        for tmp, final in staged:
            prev = _prev_path(final)
            if final.exists():
                if not prev.exists() or (vouched[final] and sha256_file(final) == vouched[final]):
                    os.replace(final, prev)
            os.replace(tmp, final)

        entry = {
            "key": key,
            "image_source": str(annotation.image_source),
            "labels": labels_rel,
            "annotations": ann_rel,
            "labels_sha256": labels_sha,
            "annotations_sha256": ann_sha,
            "n_objects": len(annotation.objects),
            "modified": meta["modified"],
        }
        images = self._project["images"]
        for i, old in enumerate(images):
            if old["key"] == key:
                entry["revision"] = int(old.get("revision", 0)) + 1
                images[i] = entry
                break
        else:
            entry["revision"] = 1
            images.append(entry)
        self._write_project()
        for _, final in staged:
            _prev_path(final).unlink(missing_ok=True)

    def _write_project(self) -> None:
        self._project["modified"] = now_iso()
        text = json.dumps(self._project, indent=1)
        with atomic_path(self.path / PROJECT_FILE) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _prev_path(path: Path) -> Path:
    """labels/a.tif -> labels/a.prev.tif (same folder, so os.replace stays atomic)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _write_labels(tifffile, path: Path, labels: np.ndarray) -> None:
    # Tiles keep big label images readable crop by crop; small ones stay one strip.
    big = labels.ndim >= 2 and labels.shape[-1] >= 1024 and labels.shape[-2] >= 1024
    tifffile.imwrite(
        path,
        labels,
        compression="zlib",
        tile=(256, 256) if big else None,
        metadata=None,
    )


def objects_from_labels(labels: np.ndarray, known: Sequence[ObjectRecord] = ()) -> list[ObjectRecord]:
    """Records for every id in ``labels``: ``known`` ones kept, hand-painted ones added (edited, no box)."""
    present = {int(v) for v in np.unique(labels) if v != 0}
    records = [o for o in known if o.id in present]
    have = {o.id for o in records}
    records += [ObjectRecord(id=i, prompt={"type": "paint"}, edited=True) for i in sorted(present - have)]
    return sorted(records, key=lambda o: o.id)
