"""3D Dice of box propagation through a stack, against per-slice boxes and a copied mask, and time per slice.

Data: the 3D nuclei stack (31 x 61 x 57, uint16) and its instance labels that the ``stardist``
wheel on PyPI ships (BSD-3; ``stardist/data/images/img3d.tif`` and ``mask3d.tif``, what
``stardist.data.test_image_nuclei_3d`` returns; its docstring calls them "synthetic nuclei").
Fetch the wheel with ``pip download stardist --no-deps -d DIR``; the TIFFs are read from the
wheel (a zip) without installing stardist. No model was trained on it.

Per object (each label of the mask; its middle slice: the middle of its z range):

- ``propagation``: one tight box on the object's middle slice, all objects propagated at once
  (``hrmedseg.engine.propagation.propagate``, method "neighbour", default rules); the same with
  the rules that were the defaults before issue 16's analysis (``RULES_BEFORE``), and with
  ``--mask-prompt`` with the neighbour's logits as mask prompt;
- ``per-slice boxes`` (the upper bound): the tight box on every slice the object is on;
- ``copied mask`` (the floor): the middle slice's mask copied to every slice of the stack.

Dice is per object over the whole volume, then the mean over objects. Time per slice: the
propagation's wall time over the slices it segmented (each slice: one crop embedding for all
objects on it, then their decoder calls), from an empty embedding cache; the baseline in the same
run is the per-slice-box pass over the same slices, also from an empty cache. The machine's
CPU threads are shared: figures are noisy.

Usage:
  python bench/bench_propagation.py --wheel DIR/stardist-*.whl NAME=MODEL [NAME=MODEL ...] [--json out.json] [--device cpu] [--threads N] [--mask-prompt]
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from datetime import date

import numpy as np
import tifffile
import torch
from report import cpu_name, print_and_save

from hrmedseg.engine import BoxPredictor
from hrmedseg.engine.propagation import SlicePrompt, propagate

IMAGE, MASK = "stardist/data/images/img3d.tif", "stardist/data/images/mask3d.tif"
#: the neighbour rules that were the defaults before issue 16's analysis (a same-run baseline)
RULES_BEFORE = dict(click=True, grow=0.05, min_score=0.7, min_overlap=0.3, min_relative_score=0.0, max_growth=0.0, max_taken=1.0)


def read_wheel(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(image (Z, H, W), instance labels (Z, H, W)) from the stardist wheel."""
    with zipfile.ZipFile(path) as whl:
        return tuple(tifffile.imread(io.BytesIO(whl.read(name))) for name in (IMAGE, MASK))  # type: ignore[return-value]


def tight_box(mask2d: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask2d)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def middle_slices(gt: np.ndarray, ids: list[int]) -> dict[int, int]:
    out = {}
    for oid in ids:
        zs = np.nonzero((gt == oid).any(axis=(1, 2)))[0]
        out[oid] = int(zs[len(zs) // 2])
    return out


def per_slice_boxes(predictor: BoxPredictor, image: np.ndarray, gt: np.ndarray, ids: list[int]) -> tuple[np.ndarray, int]:
    """(labels from the tight box of every object on every slice it is on, slices segmented)."""
    from hrmedseg.engine import paste_object

    labels = np.zeros(gt.shape, np.uint32)
    n = 0
    for z in range(len(image)):
        here = [oid for oid in ids if (gt[z] == oid).any()]
        if not here:
            continue
        boxes = np.stack([tight_box(gt[z] == oid) for oid in here])
        for oid, obj in zip(here, predictor.predict_boxes(image[z], boxes)):
            paste_object(labels[z], obj, oid)
        n += 1
    return labels, n


def evaluate(predictor: BoxPredictor, image: np.ndarray, gt: np.ndarray, mask_prompt: bool = False) -> dict:
    ids = sorted(int(i) for i in np.unique(gt) if i)
    middle = middle_slices(gt, ids)
    prompts = [SlicePrompt(z, oid, box=tight_box(gt[z] == oid)) for oid, z in middle.items()]
    out: dict = {"objects": len(ids), "slices": int(len(image))}
    runs = [("propagation", {}), ("propagation, rules before issue 16's analysis", RULES_BEFORE)]
    if mask_prompt:
        runs.append(("propagation + mask prompt", {"mask_prompt": True}))
    for name, rules in runs:
        predictor.clear_cache()
        calls = predictor.encoder_calls
        t0 = time.perf_counter()
        result = propagate(predictor, image, prompts, **rules)
        seconds = time.perf_counter() - t0
        visited = predictor.encoder_calls - calls
        per = {oid: dice(result.labels == oid, gt == oid) for oid in ids}
        out[name] = {
            "dice": float(np.mean(list(per.values()))),
            "dice_even_ids": float(np.mean([d for oid, d in per.items() if oid % 2 == 0])),
            "dice_odd_ids": float(np.mean([d for oid, d in per.items() if oid % 2])),
            "seconds": seconds, "slices_encoded": visited, "s_per_slice": seconds / max(visited, 1),
            "mean_extent": float(np.mean([hi - lo + 1 for lo, hi in result.extents.values()])),
        }
    predictor.clear_cache()
    t0 = time.perf_counter()
    upper, n = per_slice_boxes(predictor, image, gt, ids)
    seconds = time.perf_counter() - t0
    per = {oid: dice(upper == oid, gt == oid) for oid in ids}
    out["per-slice boxes"] = {"dice": float(np.mean(list(per.values()))), "seconds": seconds,
                              "dice_even_ids": float(np.mean([d for oid, d in per.items() if oid % 2 == 0])),
                              "dice_odd_ids": float(np.mean([d for oid, d in per.items() if oid % 2])),
                              "slices_encoded": n, "s_per_slice": seconds / max(n, 1)}
    floor = []
    for oid, z in middle.items():
        mid = next(iter(predictor.predict_boxes(image[z], tight_box(gt[z] == oid)[None])))
        plane = np.zeros(gt.shape[1:], bool)
        y0, y1, x0, x1 = mid.region
        plane[y0:y1, x0:x1] = mid.mask
        floor.append(dice(np.broadcast_to(plane, gt.shape), gt == oid))
    out["copied mask"] = {"dice": float(np.mean(floor)), "dice_even_ids": float(np.mean([d for oid, d in zip(middle, floor) if oid % 2 == 0])),
                          "dice_odd_ids": float(np.mean([d for oid, d in zip(middle, floor) if oid % 2]))}
    out["gt_mean_extent"] = float(np.mean([len(np.nonzero((gt == oid).any(axis=(1, 2)))[0]) for oid in ids]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=MODEL (registry name or weights path)")
    ap.add_argument("--wheel", required=True, help="the stardist wheel (pip download stardist --no-deps -d DIR)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--mask-prompt", action="store_true", help="also propagate with the neighbour's logits as mask prompt")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image, gt = read_wheel(args.wheel)
    result: dict = {"data": f"stardist wheel {IMAGE} + {MASK}", "shape": list(image.shape), "device": args.device,
                    "cpu": cpu_name(), "threads": torch.get_num_threads(), "date": str(date.today()), "models": {}}
    for spec in args.models:
        name, _, model = spec.partition("=")
        predictor = BoxPredictor(model or name, device=args.device, backend="auto")
        result["models"][name] = evaluate(predictor, image, gt, args.mask_prompt)
        result["models"][name]["backend"] = predictor.backend
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
