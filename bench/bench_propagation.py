"""3D Dice of box propagation through a stack, against per-slice boxes and a copied mask, and time per slice.

Data (``--dataset``; bench/propagation_data.py reads them from the wheel, a zip, without installing it):

- ``stardist`` (default): the 3D nuclei stack (31 x 61 x 57, uint16) and its instance labels that
  the ``stardist`` wheel on PyPI ships (BSD-3; ``stardist/data/images/img3d.tif`` and ``mask3d.tif``,
  what ``stardist.data.test_image_nuclei_3d`` returns; its docstring calls them "synthetic
  nuclei"). Fetch it with ``pip download stardist --no-deps -d DIR``.
- ``mni152``: the MNI ICBM152 2009a nonlinear symmetric T1 template (1 mm, an average of 152 real
  scans: real MRI, smoother than one scan) that the ``nilearn`` wheel ships, sliced along
  ``--axis``, with objects from its grey/white-matter probability maps (``--objects``:
  ``hemispheres``, the default, the brain's left and right halves; ``tissue``, white and grey
  matter; ``brain``; see propagation_data.MNI_OBJECTS). Fetch it with
  ``pip download nilearn==0.14.1 --no-deps -d DIR``; nibabel reads the NIfTI files.

``--step N`` keeps every N-th slice (slices N voxels apart: a coarser, harder stack) to make a run
on the CPU affordable; the Dice is then over the kept slices. No model was trained on either.

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
  python bench/bench_propagation.py --dataset mni152 --wheel DIR/nilearn-0.14.1-py3-none-any.whl [--axis axial|coronal|sagittal] [--objects hemispheres|tissue|brain] [--step N] [--no-rules-before] NAME=MODEL ...
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import numpy as np
import torch
from propagation_data import AXES, MNI_OBJECTS, MNI_PREFIX, STARDIST_IMAGE, STARDIST_MASK, every_nth_slice, read_mni152_wheel, read_stardist_wheel
from report import cpu_name, print_and_save

from hrmedseg.engine import BoxPredictor
from hrmedseg.engine.propagation import SlicePrompt, propagate

#: the neighbour rules that were the defaults before issue 16's analysis (a same-run baseline)
RULES_BEFORE = dict(click=True, grow=0.05, min_score=0.7, min_overlap=0.3, min_relative_score=0.0, max_growth=0.0, max_taken=1.0)


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


def stops_json(stops: dict[int, dict[int, tuple[int, str]]]) -> dict[str, dict[str, list]]:
    """``PropagationResult.stops`` as JSON: {object id: {"+1" or "-1": [slice, rule that stopped the chain]}}."""
    return {str(oid): {f"{step:+d}": [int(z), reason] for step, (z, reason) in chains.items()} for oid, chains in stops.items()}


def dice_summary(per: dict[int, float]) -> dict:
    """Mean 3D Dice over objects, over even and odd label ids (settings were once chosen on the even ones), and per object."""
    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {"dice": mean(list(per.values())), "dice_even_ids": mean([d for oid, d in per.items() if oid % 2 == 0]),
            "dice_odd_ids": mean([d for oid, d in per.items() if oid % 2]), "dice_per_object": {str(oid): d for oid, d in per.items()}}


def evaluate(predictor: BoxPredictor, image: np.ndarray, gt: np.ndarray, mask_prompt: bool = False, rules_before: bool = True) -> dict:
    """Every method's 3D Dice and time on one (Z, H, W) stack and its (Z, H, W) labels (see the module docstring)."""
    ids = sorted(int(i) for i in np.unique(gt) if i)
    middle = middle_slices(gt, ids)
    prompts = [SlicePrompt(z, oid, box=tight_box(gt[z] == oid)) for oid, z in middle.items()]
    out: dict = {"objects": len(ids), "slices": int(len(image)), "middle_slices": {str(oid): z for oid, z in middle.items()}}
    runs = [("propagation", {})]
    if rules_before:
        runs.append(("propagation, rules before issue 16's analysis", RULES_BEFORE))
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
            **dice_summary(per),
            "seconds": seconds, "slices_encoded": visited, "s_per_slice": seconds / max(visited, 1),
            "mean_extent": float(np.mean([hi - lo + 1 for lo, hi in result.extents.values()])),
            "extents": {str(oid): list(map(int, ext)) for oid, ext in result.extents.items()},
            "stops": stops_json(result.stops),
        }
    predictor.clear_cache()
    t0 = time.perf_counter()
    upper, n = per_slice_boxes(predictor, image, gt, ids)
    seconds = time.perf_counter() - t0
    per = {oid: dice(upper == oid, gt == oid) for oid in ids}
    out["per-slice boxes"] = {**dice_summary(per), "seconds": seconds, "slices_encoded": n, "s_per_slice": seconds / max(n, 1)}
    floor = {}
    for oid, z in middle.items():
        mid = next(iter(predictor.predict_boxes(image[z], tight_box(gt[z] == oid)[None])))
        plane = np.zeros(gt.shape[1:], bool)
        y0, y1, x0, x1 = mid.region
        plane[y0:y1, x0:x1] = mid.mask
        floor[oid] = dice(np.broadcast_to(plane, gt.shape), gt == oid)
    out["copied mask"] = dice_summary(floor)
    out["gt_mean_extent"] = float(np.mean([len(np.nonzero((gt == oid).any(axis=(1, 2)))[0]) for oid in ids]))
    out["gt_extents"] = {str(oid): [int(zs[0]), int(zs[-1])] for oid in ids for zs in [np.nonzero((gt == oid).any(axis=(1, 2)))[0]]}
    return out


def load(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image (Z, H, W), labels (Z, H, W), what they are) for the chosen dataset, axis and step."""
    if args.dataset == "stardist":
        image, gt = read_stardist_wheel(args.wheel)
        about: dict = {"data": f"stardist wheel {STARDIST_IMAGE} + {STARDIST_MASK}"}
    else:
        image, gt = read_mni152_wheel(args.wheel, args.axis, args.objects)
        about = {"data": f"nilearn wheel {MNI_PREFIX.format('{t1,gm,wm}')}", "axis": args.axis,
                 "objects": MNI_OBJECTS[args.objects]}
    about["full_shape"] = list(image.shape)
    image, gt = every_nth_slice(image, gt, args.step)
    about.update(step=args.step, shape=list(image.shape))
    return image, gt, about


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=MODEL (registry name or weights path)")
    ap.add_argument("--dataset", choices=("stardist", "mni152"), default="stardist")
    ap.add_argument("--wheel", required=True, help="the dataset's wheel: pip download stardist (or nilearn==0.14.1) --no-deps -d DIR")
    ap.add_argument("--axis", choices=AXES, default="axial", help="mni152: the axis slices are taken along")
    ap.add_argument("--objects", choices=tuple(MNI_OBJECTS), default="hemispheres", help="mni152: the object set (propagation_data.MNI_OBJECTS)")
    ap.add_argument("--step", type=int, default=1, help="keep every N-th slice only (slices N apart; the Dice is over those)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--mask-prompt", action="store_true", help="also propagate with the neighbour's logits as mask prompt")
    ap.add_argument("--no-rules-before", action="store_true", help="skip the propagation with the rules before issue 16's analysis")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image, gt, about = load(args)
    result: dict = {**about, "device": args.device, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "date": str(date.today()), "models": {}}
    for spec in args.models:
        name, _, model = spec.partition("=")
        predictor = BoxPredictor(model or name, device=args.device, backend="auto")
        t0 = time.perf_counter()
        result["models"][name] = evaluate(predictor, image, gt, args.mask_prompt, not args.no_rules_before)
        result["models"][name].update(backend=predictor.backend, wall_s=time.perf_counter() - t0)
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
