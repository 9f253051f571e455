"""Training data: image/mask pairs from folders or the annotation store, crops, augmentation, box prompts.

Layouts read by :func:`discover_samples` (first match wins):

1. ``DIR/manifest.json`` with ``items: [{"name", "image", "mask"}, ...]`` (paths relative to DIR);
2. ``DIR/images/<stem>.<ext>`` + ``DIR/masks/<stem>.<ext>`` (same stem, any image extension);
3. an annotation store (``hrmedseg.store.AnnotationStore.open(DIR)``), once the core provides it.

Masks are label images: instance labels (0 = background, 1..N one object each) or class labels
turned into class channels by a :class:`ClassRule` list such as ``"disc:>=1,cup:2"``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from hrmedseg.engine.intensity import DEFAULT_INTENSITY, default_channels, whole_image_rgb
from hrmedseg.errors import InputError
from hrmedseg.io.readers import ArrayImage, decode_with_pillow

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


# --------------------------------------------------------------------------------------------
# Reading pixels
# --------------------------------------------------------------------------------------------


def _read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(path))
    return decode_with_pillow(path)  # the engine's decoding of PNG / JPEG


def to_rgb_uint8(array: np.ndarray, source: str = "image") -> np.ndarray:
    """Any grey / two-channel / RGB(A) array -> (H, W, 3) uint8, as the engine sees it.

    The engine's pixel pipeline (``hrmedseg.engine.intensity``) under ``DEFAULT_INTENSITY``:
    uint8 passes through; other types are scaled per channel, percentiles 1..99.8 -> 0..255, rounded; grey is
    repeated, two channels become red and green, a fourth (alpha) is dropped. Booleans are 0/255.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 2, 3, 4) and a.shape[-1] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channel-first TIFF
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{source}: expected a 2D greyscale or RGB(A) image, got an array of shape {array.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    # source_key given: a training image is read once, so no cache token is needed.
    image = ArrayImage(a, channel=list(default_channels(a.shape[-1])), axes="YXC", name=source, source_key=source)
    return whole_image_rgb(image, DEFAULT_INTENSITY)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/TIFF/JPEG image as (H, W, 3) uint8; errors name the file."""
    path = Path(path)
    try:
        array = _read_array(path)
    except Exception as err:  # noqa: BLE001 - any decoder error means "unreadable"
        raise InputError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    return to_rgb_uint8(array, str(path))


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label image as (H, W) int32; a colour mask must have equal channels."""
    path = Path(path)
    try:
        mask = _read_array(path)
    except Exception as err:  # noqa: BLE001
        raise InputError(f"cannot read mask {path}: {type(err).__name__}: {err}") from err
    if mask.ndim == 3:
        channels = mask[..., :3] if mask.shape[-1] >= 3 else mask[..., :1]
        if not all(np.array_equal(channels[..., 0], channels[..., c]) for c in range(channels.shape[-1])):
            raise InputError(f"mask {path} has colour channels that differ; expected a single-channel label image")
        mask = channels[..., 0]
    if mask.ndim != 2:
        raise InputError(f"mask {path} has shape {mask.shape}; expected a 2D label image")
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
            raise InputError(f"mask {path} holds non-integer values; expected integer labels")
    return mask.astype(np.int32)


def image_shape(path: Path) -> tuple[int, int]:
    """(H, W) from the file header, without decoding the pixels."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            shape = tif.pages[0].shape
        if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
            return int(shape[1]), int(shape[2])
        return int(shape[0]), int(shape[1])
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


# --------------------------------------------------------------------------------------------
# Classes from label images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassRule:
    """One output class: the pixels whose label satisfies ``op value`` (op '>=' or '==')."""

    name: str
    op: str
    values: tuple[int, ...]

    def apply(self, labels: np.ndarray) -> np.ndarray:
        if self.op == ">=":
            return labels >= self.values[0]
        return np.isin(labels, self.values)

    def to_str(self) -> str:
        return f"{self.name}:{'>=' + str(self.values[0]) if self.op == '>=' else '|'.join(map(str, self.values))}"


def parse_classes(spec: str | None) -> list[ClassRule] | None:
    """``"disc:>=1,cup:2"`` -> rules; ``"a:1|3"`` means label 1 or 3; None/'' -> None (instances)."""
    if not spec:
        return None
    rules = []
    for part in spec.split(","):
        if ":" not in part:
            raise InputError(f"class spec '{part}' must be NAME:RULE, e.g. 'disc:>=1' or 'cup:2' (in '{spec}')")
        name, rule = (s.strip() for s in part.split(":", 1))
        try:
            if rule.startswith(">="):
                rules.append(ClassRule(name, ">=", (int(rule[2:]),)))
            else:
                rules.append(ClassRule(name, "==", tuple(int(v) for v in rule.lstrip("=").split("|"))))
        except ValueError as err:
            raise InputError(f"class spec '{part}': '{rule}' is not '>=N' or 'N' or 'N|M'") from err
    return rules


def class_channels(labels: np.ndarray, rules: Sequence[ClassRule] | None) -> np.ndarray:
    """(H, W) labels -> (C2, H, W) uint8; with no rules, one foreground channel (label > 0)."""
    if not rules:
        return (labels > 0)[None].astype(np.uint8)
    return np.stack([r.apply(labels) for r in rules]).astype(np.uint8)


def object_masks(
    labels: np.ndarray,
    rules: Sequence[ClassRule] | None,
    min_area: int = 4,
    max_objects: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Objects to prompt with boxes: (K, H, W) bool, at most ``max_objects`` picked at random.

    With no rules every instance label is one object; with rules each connected component of
    each class is one (the disc and the cup of a fundus image).
    """
    layers: list[tuple[np.ndarray, int]] = []  # (label image, id) per object
    if not rules:
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        layers = [(labels, int(i)) for i, c in zip(ids, counts) if c >= min_area]
    else:
        from skimage.measure import label as connected_components

        for rule in rules:
            components = connected_components(rule.apply(labels), connectivity=2)
            ids, counts = np.unique(components[components > 0], return_counts=True)
            layers += [(components, int(i)) for i, c in zip(ids, counts) if c >= min_area]
    if max_objects is not None and len(layers) > max_objects:
        rng = rng or np.random.default_rng(0)
        layers = [layers[i] for i in np.sort(rng.choice(len(layers), max_objects, replace=False))]
    if not layers:
        return np.zeros((0,) + labels.shape, bool)
    return np.stack([lab == i for lab, i in layers])


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box of a (H, W) mask as float [x0, y0, x1, y1] (x1, y1 exclusive)."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)


def jitter_box(box: np.ndarray, rng: np.random.Generator, fraction: float, limit: float, size: tuple[int, int]) -> np.ndarray:
    """Move each side of a box by up to ``fraction`` of the box side (at most ``limit`` pixels)."""
    if fraction <= 0:
        return box
    w, h = box[2] - box[0], box[3] - box[1]
    span = np.minimum(np.array([w, h, w, h], np.float32) * fraction, limit)
    moved = box + rng.uniform(-1, 1, 4).astype(np.float32) * span
    moved[[0, 2]] = np.clip(moved[[0, 2]], 0, size[1])
    moved[[1, 3]] = np.clip(moved[[1, 3]], 0, size[0])
    if moved[2] - moved[0] < 1 or moved[3] - moved[1] < 1:
        return box
    return moved


# --------------------------------------------------------------------------------------------
# Samples: where pixels and labels come from
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One annotated image; ``load()`` returns ((H, W, 3) uint8 image, (H, W) int32 labels)."""

    name: str
    loader: Callable[[], tuple[np.ndarray, np.ndarray]]
    shape: tuple[int, int] | None = None
    source: str = ""

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self.loader()
        if image.shape[:2] != labels.shape:
            raise InputError(
                f"{self.source or self.name}: mask shape {labels.shape} does not match image shape {image.shape[:2]}"
            )
        return image, labels


@dataclass
class PairLoader:
    """Picklable loader of an image file and its mask file (DataLoader workers pickle samples)."""

    image_path: Path
    mask_path: Path

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return read_image(self.image_path), read_mask(self.mask_path)


@dataclass
class StoreLoader:
    """Loader of one image of the plugin's annotation store."""

    store_path: Path
    key: str
    class_index: bool = False  # labels become class indices (store class k -> k + 1; unclassified -> 0)

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        from hrmedseg.store import AnnotationStore

        store = AnnotationStore.open(self.store_path)
        annotation = store.load(self.key)
        source = annotation.image_source
        image = read_image(source) if isinstance(source, (str, os.PathLike)) else to_rgb_uint8(np.asarray(source))
        labels = np.asarray(annotation.labels).astype(np.int32)
        if self.class_index:
            index = {c.name: k + 1 for k, c in enumerate(store.classes())}
            lookup = np.zeros(int(labels.max()) + 1, np.int32)
            for obj in annotation.objects:
                if obj.class_name is not None and obj.id < len(lookup):
                    lookup[obj.id] = index[obj.class_name]
            labels = lookup[labels]
        return image, labels


def store_class_rules(*sample_lists: Sequence[Sample]) -> list[ClassRule] | None:
    """The store's object classes as output classes, when every sample comes from one store that has classes.

    Switches those samples' loaders to class-index labels and returns one rule per class
    (channel k = the objects of class k); None, changing nothing, otherwise (folders, or a store
    without classes: then every object is foreground).
    """
    from hrmedseg.store import AnnotationStore

    loaders = [s.loader for samples in sample_lists for s in samples]
    if not loaders or not all(isinstance(loader, StoreLoader) for loader in loaders):
        return None
    stores = {Path(loader.store_path).resolve() for loader in loaders}
    if len(stores) != 1:
        return None
    classes = AnnotationStore.open(stores.pop()).classes()
    if not classes:
        return None
    for loader in loaders:
        loader.class_index = True
    return [ClassRule(c.name, "==", (k + 1,)) for k, c in enumerate(classes)]


@dataclass
class DatasetInfo:
    """What was found in a data folder, for logs and the model card."""

    root: str
    layout: str
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)
    licence: str | None = None
    citation: str | None = None


def _find_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            found.setdefault(p.stem, p)
    return found


def discover_samples(root: str | os.PathLike, check_shapes: bool = True) -> DatasetInfo:
    """Find every image/mask pair under ``root`` (see the module docstring for the layouts).

    Pairs whose files are unreadable, or whose mask size differs from the image, are skipped
    with a warning that names them; finding none at all is an error.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"training data not found: {root}")
    licence = citation = None
    pairs: list[tuple[str, Path, Path]] = []
    layout = ""
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read {manifest}: {err}") from err
        licence, citation = meta.get("licence"), meta.get("citation")
        items = meta.get("items") or []
        pairs = [(it.get("name") or Path(it["image"]).stem, root / it["image"], root / it["mask"]) for it in items
                 if "image" in it and "mask" in it]
        layout = "manifest.json"
    if not pairs and (root / "images").is_dir() and (root / "masks").is_dir():
        images, masks = _find_by_stem(root / "images"), _find_by_stem(root / "masks")
        pairs = [(stem, images[stem], masks[stem]) for stem in images if stem in masks]
        unmatched = sorted(set(images) ^ set(masks))
        if unmatched:
            log.warning("%d files in %s/images or /masks have no partner (e.g. %s)", len(unmatched), root, unmatched[:3])
        layout = "images/ + masks/"
    if not pairs:
        store_samples = _store_samples(root)
        if store_samples is not None:
            return DatasetInfo(str(root), "annotation store", store_samples)
        raise InputError(
            f"no image/mask pairs found in {root}: expected {root}/images/<name>.png with {root}/masks/<name>.png "
            f"(same name), a manifest.json with 'items', or an annotation store"
        )
    samples, skipped = [], []
    for name, image_path, mask_path in pairs:
        shape = None
        if check_shapes:
            try:
                shape = image_shape(image_path)
                mask_shape = image_shape(mask_path)
            except Exception as err:  # noqa: BLE001 - unreadable header: skip the pair, say which
                skipped.append(f"{name}: unreadable ({type(err).__name__}: {err})")
                continue
            if shape != mask_shape:
                skipped.append(f"{name}: mask {mask_shape[0]}x{mask_shape[1]} does not match image {shape[0]}x{shape[1]}")
                continue
        samples.append(Sample(name, PairLoader(image_path, mask_path), shape, str(image_path)))
    for s in skipped:
        log.warning("skipping %s", s)
    if not samples:
        raise InputError(f"no usable image/mask pairs in {root} ({len(skipped)} skipped: {'; '.join(skipped[:3])})")
    return DatasetInfo(str(root), layout, samples, skipped, licence, citation)


def _store_samples(root: Path) -> list[Sample] | None:
    from hrmedseg.store import AnnotationStore

    try:
        store = AnnotationStore.open(root)
    except Exception:  # noqa: BLE001 - not a store: the caller reports "no pairs"
        return None
    keys = list(store.image_keys())
    if not keys:
        raise InputError(f"the annotation store {root} holds no annotated images")
    samples = []
    for key in keys:  # check each image once here, so a bad one is skipped, not fatal mid-training
        try:
            annotation = store.load(key)
            labels = np.asarray(annotation.labels)
            if labels.ndim != 2:
                raise InputError(f"labels of shape {labels.shape}: training takes 2D images")
            if not labels.any():
                raise InputError("no objects annotated")
            source = Path(annotation.image_source)
            if not source.is_file():
                raise InputError(f"its image {source} is not found")
            if image_shape(source) != labels.shape:
                raise InputError(f"labels {labels.shape} do not match its image {source} {image_shape(source)}")
        except Exception as err:  # noqa: BLE001 - name the image, keep the others
            log.warning("skipping store image '%s': %s", key, err)
            continue
        samples.append(Sample(str(key), StoreLoader(root, key), labels.shape, f"{root}:{key}"))
    if not samples:
        raise InputError(f"no usable annotated images in the annotation store {root} (see the warnings)")
    return samples


def split_samples(samples: Sequence[Sample], val_fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Split by image (never crops of one image on both sides); at least one of each when possible."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = int(round(len(samples) * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and len(samples) >= 2:
        n_val = min(max(n_val, 1), len(samples) - 1)
    else:
        n_val = 0
    val = [samples[i] for i in order[:n_val]]
    train = [samples[i] for i in order[n_val:]]
    return train, val


# --------------------------------------------------------------------------------------------
# Crops and augmentation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSettings:
    """How a training input of ``size`` x ``size`` is cut from an image.

    mode 'crop': after rescaling by ``scale``, a window at native resolution (padded when the
    image is smaller), centred on a random foreground pixel with probability ``foreground_prob``.
    mode 'fit': the whole image resized so its longest side is ``size``, then padded (as
    SamPredictor does at inference).
    """

    size: int = 1024
    mode: str = "crop"
    scale: float = 1.0
    foreground_prob: float = 0.8
    pad_value: tuple[int, int, int] = (124, 116, 104)  # SAM pixel mean: normalises to about 0


def _resize(array: np.ndarray, shape: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    if array.shape[:2] == shape:
        return array
    if nearest:
        im = Image.fromarray(array.astype(np.int32), mode="I")
        return np.asarray(im.resize((shape[1], shape[0]), Image.NEAREST)).astype(np.int32)
    return np.asarray(Image.fromarray(array).resize((shape[1], shape[0]), Image.BILINEAR))


def place(image: np.ndarray, labels: np.ndarray, settings: CropSettings, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Cut/resize then pad: -> ((S, S, 3) image, (S, S) labels, (h, w) of the valid top-left area)."""
    size = settings.size
    h, w = labels.shape
    if settings.mode == "fit":
        factor = size / max(h, w)
        shape = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
        image, labels = _resize(image, shape, False), _resize(labels, shape, True)
    else:
        if settings.scale != 1.0:
            shape = (max(1, int(round(h * settings.scale))), max(1, int(round(w * settings.scale))))
            image, labels = _resize(image, shape, False), _resize(labels, shape, True)
        h, w = labels.shape
        if h > size or w > size:
            fg = np.flatnonzero(labels.ravel() > 0)
            if fg.size and rng.random() < settings.foreground_prob:
                cy, cx = divmod(int(fg[rng.integers(fg.size)]), w)
                y0 = int(np.clip(cy - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, max(h - size, 0)))
                x0 = int(np.clip(cx - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, max(w - size, 0)))
            else:
                y0 = int(rng.integers(0, max(h - size, 0) + 1))
                x0 = int(rng.integers(0, max(w - size, 0) + 1))
            image = image[y0:y0 + size, x0:x0 + size]
            labels = labels[y0:y0 + size, x0:x0 + size]
    vh, vw = labels.shape
    out_image = np.empty((size, size, 3), np.uint8)
    out_image[:] = np.asarray(settings.pad_value, np.uint8)
    out_image[:vh, :vw] = image
    out_labels = np.zeros((size, size), np.int32)
    out_labels[:vh, :vw] = labels
    return out_image, out_labels, (vh, vw)


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast, brightness and gamma on a (h, w, 3) uint8 image."""
    x = image.astype(np.float32) / 255.0
    x = x ** rng.uniform(0.75, 1.33)
    x = (x - x.mean()) * rng.uniform(0.8, 1.25) + x.mean() + rng.uniform(-0.08, 0.08)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def augment_geometry(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flips and 90-degree turn on every (S, S, ...) array."""
    k = int(rng.integers(4))
    flip_y, flip_x = rng.random() < 0.5, rng.random() < 0.5
    out = []
    for a in arrays:
        if flip_y:
            a = a[::-1]
        if flip_x:
            a = a[:, ::-1]
        out.append(np.ascontiguousarray(np.rot90(a, k, axes=(0, 1))))
    return out


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class SegmentationCrops(Dataset):
    """Training/validation inputs for either model.

    Each item is a dict with ``image`` (3, S, S) uint8, ``name`` and
    - task 'semantic' (prompt-free HRMedSeg): ``target`` (C2, S, S) uint8;
    - task 'box' (HRMedSegSAM): ``boxes`` (K, 4) float xyxy in the S x S input and ``masks``
      (K, S, S) uint8, K <= max_boxes (0 when the crop holds no object).

    Validation sets (``train=False``) are deterministic: the same crops every epoch, no jitter.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        task: str,
        crop: CropSettings,
        classes: Sequence[ClassRule] | None = None,
        train: bool = True,
        repeats: int = 1,
        max_boxes: int = 16,
        box_jitter: float = 0.1,
        box_jitter_limit: float = 20.0,
        min_object_area: int = 4,
        seed: int = 0,
    ) -> None:
        if task not in ("semantic", "box"):
            raise ValueError(f"task must be 'semantic' or 'box', not {task!r}")
        self.samples = list(samples)
        self.task, self.crop, self.classes, self.train = task, crop, list(classes) if classes else None, train
        self.repeats, self.max_boxes = max(1, repeats), max_boxes
        self.box_jitter, self.box_jitter_limit, self.min_object_area = box_jitter, box_jitter_limit, min_object_area
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def _rng(self, index: int) -> np.random.Generator:
        if self.train:
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return np.random.default_rng([self.seed, index])

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index % len(self.samples)]
        rng = self._rng(index)
        image, labels = sample.load()
        image, labels, (vh, vw) = place(image, labels, self.crop, rng)
        if self.train:
            image[:vh, :vw] = augment_intensity(image[:vh, :vw], rng)
            image, labels = augment_geometry([image, labels], rng)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), "name": sample.name}
        if self.task == "semantic":
            item["target"] = torch.from_numpy(class_channels(labels, self.classes))
            return item
        masks = object_masks(labels, self.classes, self.min_object_area, self.max_boxes, rng)
        boxes = np.zeros((len(masks), 4), np.float32)
        for i, m in enumerate(masks):
            box = mask_box(m)
            boxes[i] = jitter_box(box, rng, self.box_jitter, self.box_jitter_limit, labels.shape) if self.train else box
        item["boxes"] = torch.from_numpy(boxes)
        item["masks"] = torch.from_numpy(masks.astype(np.uint8))
        return item


def collate(items: list[dict]) -> dict:
    """Stack images (and semantic targets); keep per-image boxes/masks as lists (K varies)."""
    batch = {"image": torch.stack([it["image"] for it in items]), "name": [it["name"] for it in items]}
    if "target" in items[0]:
        batch["target"] = torch.stack([it["target"] for it in items])
    else:
        batch["boxes"] = [it["boxes"] for it in items]
        batch["masks"] = [it["masks"] for it in items]
    return batch
