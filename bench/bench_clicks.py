"""Dice after a box and after 1, 3 and 5 clicks of a simulated annotator, and CPU time per click.

Each held-out object (the split of scripts/prepare_device_payload.py, ``is_val``: images no
training saw) is prompted with its tight box through the engine, then refined by clicks: the next
click goes to the centre of the largest error region (the distance-transform maximum of the
larger of the false negatives and the false positives), positive for a missed part, negative for
a wrong one; every click is decoded with the box, all clicks so far and the
previous low-res logits on the same cached crop, as the annotator does. Variants (``VARIANTS``):
the engine's default ``pixel`` click update (the box's logits kept, each click's native pixel set by
a local threshold shift: the model's own click fix, "pixel, disc" the depth disc of ``ClickFix()``
whatever the model's), the ``local`` update (box + clicks decoded without the mask prompt, the
result taken only in the part the newest click is about; both :mod:`hrmedseg.engine.click_update`),
SAM's update with the previous logits as mask prompt (the default before), and SAM's update
from box + clicks alone. Nuclei: DSB 2018 instances; fundus: the
Drishti-GS optic disc and cup at native resolution (read from ../shared, never the repository).

Time per click: wall time of one refinement call (its crop's embedding cached, as in the
annotator), next to the baseline measured in the same run, a box-only call on the same cached
crop. The machine's CPU threads are shared: figures are noisy.

``--timing-only`` times clicks on the package's nuclei sample (hrmedseg.data, CC0; no held-out
data needed, for machines without ../shared) with the same baseline, and reports no Dice.

Usage:
  python bench/bench_clicks.py NAME=MODEL [NAME=MODEL ...] [--images 8] [--max-objects 10] [--json out.json]
  python bench/bench_clicks.py NAME=MODEL ... --timing-only [--threads 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from eval_default_models import dice_iou
from eval_zero_shot import paste, prompts
from report import cpu_name, print_and_save
from scipy import ndimage

CLICKS = (1, 3, 5)


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(x, y) at the centre of the larger error region and its label (1: missed, 0: wrong); None if perfect."""
    missed, wrong = gt & ~pred, pred & ~gt
    error, label = (missed, 1) if missed.sum() >= wrong.sum() else (wrong, 0)
    if not error.any():
        return None
    dist = ndimage.distance_transform_edt(np.pad(error, 1))[1:-1, 1:-1]  # the image border is a border too
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x + 0.5, y + 0.5]), label


def refine(predictor, image, gt: np.ndarray, box: np.ndarray, mask_prompt: bool, policy=None) -> tuple[list[float], list[float]]:
    """Dice after the box and after each of max(CLICKS) clicks, and the seconds of each click
    (``policy``: the crop planning, default the predictor's own)."""
    first = next(predictor.predict_boxes(image, box[None], policy=policy))
    dice, seconds, last = [dice_iou(paste(first, gt.shape), gt)[0]], [], first
    xy, labels = np.zeros((0, 2)), np.zeros(0, np.int64)
    for _ in range(max(CLICKS)):
        click = next_click(paste(last, gt.shape), gt)
        if click is None:  # perfect already: it stays so
            dice.append(dice[-1])
            continue
        xy, labels = np.r_[xy, click[0][None]], np.r_[labels, click[1]]
        extra = dict(mask_inputs=[last.low_res_logits], crops=[last.crop]) if mask_prompt else dict(crops=[first.crop])
        t0 = time.perf_counter()
        last = next(predictor.predict_boxes(image, box[None], points=[xy], point_labels=[labels], policy=policy, **extra))
        seconds.append(time.perf_counter() - t0)
        dice.append(dice_iou(paste(last, gt.shape), gt)[0])
    return dice, seconds


# name -> (BoxPredictor click_update, click_mask_prompt, previous logits passed as mask_inputs,
#          click_fix: None for the model's own, e.g. the fade of hrmedseg_sam_default.click_fix.json)
VARIANTS = {
    "pixel (default)": ("pixel", False, True, None),
    "pixel, disc": ("pixel", False, True, "disc"),
    "local": ("local", False, True, None),
    "sam, mask prompt": ("sam", True, True, None),
    "sam, no mask prompt": ("sam", True, False, None),
}
# The names the variants had in commands recorded in docs/benchmarks.md before "pixel" became the default.
OLD_NAMES = {"local (default)": "local", "pixel": "pixel (default)"}


def evaluate(models: dict[str, str], max_objects: int, max_images: int, device: str,
             datasets: tuple[str, ...] = ("nuclei_dsb2018", "fundus_drishtigs"), variants: tuple[str, ...] = tuple(VARIANTS),
             val: bool = True, crops: str = "annotator") -> dict:
    """Per model and dataset: Dice after the box and CLICKS clicks and ms per click of each of
    ``variants`` (the first is the box-time baseline's predictor); ``val`` False: the training split.
    ``crops``: "annotator" plans crops as the napari annotator does (``interactive_policy``),
    "batch" as ``segment()`` does (the predictor's own policy)."""
    from hrmedseg.engine import BoxPredictor, interactive_policy
    from hrmedseg.engine.click_update import ClickFix

    results: dict = {}
    for name, spec in models.items():
        predictors = {v: BoxPredictor(spec, device=device, click_update=VARIANTS[v][0], click_mask_prompt=VARIANTS[v][1],
                                      click_fix=ClickFix() if VARIANTS[v][3] == "disc" else None) for v in variants}
        # one model, one policy: every variant's predictor plans crops alike
        policy = interactive_policy(predictors[variants[0]].policy) if crops == "annotator" else None
        results[name] = {}
        for dataset in datasets:
            rows: dict[str, dict[str, list]] = {v: {"dice": [], "seconds": []} for v in variants}
            box_seconds: list[float] = []
            kinds: list[str] = []
            for _, image, objs in prompts(dataset, max_objects, max_images, val=val):
                for k, (gt, box) in enumerate(objs):
                    kinds.append(("disc", "cup")[k % 2] if dataset == "fundus_drishtigs" else "nucleus")
                    for variant, row in rows.items():
                        dice, seconds = refine(predictors[variant], image, gt, box, VARIANTS[variant][2], policy)
                        row["dice"].append(dice)
                        row["seconds"].extend(seconds)
                    t0 = time.perf_counter()  # the baseline: a box alone on the same cached crop
                    next(predictors[variants[0]].predict_boxes(image, box[None], policy=policy))
                    box_seconds.append(time.perf_counter() - t0)
                for predictor in predictors.values():
                    predictor.clear_cache()
            entry: dict = {"objects": len(kinds), "ms_per_box_cached_crop": 1000 * float(np.median(box_seconds))}
            for variant, row in rows.items():
                dice = np.array(row["dice"])  # (objects, 1 + clicks)
                groups = {"all": np.ones(len(kinds), bool)}
                if dataset == "fundus_drishtigs":
                    groups.update(disc=np.array(kinds) == "disc", cup=np.array(kinds) == "cup")
                entry[variant] = {
                    "ms_per_click_median": 1000 * float(np.median(row["seconds"])) if row["seconds"] else None,
                    "ms_per_click_mean": 1000 * float(np.mean(row["seconds"])) if row["seconds"] else None,
                    **{g: {"box": float(dice[m, 0].mean()), **{f"{c} clicks": float(dice[m, c].mean()) for c in CLICKS}}
                       for g, m in groups.items()},
                }
            results[name][dataset] = entry
    return results


def timing_only(models: dict[str, str], device: str, repeats: int = 20) -> dict:
    """Median ms per click (box + 1..5 clicks + previous logits, the default click update, cached crop) and per cached box, per model."""
    from hrmedseg.data import load_sample, sample_boxes
    from hrmedseg.engine import BoxPredictor, interactive_policy
    from hrmedseg.io import read_boxes

    image = load_sample("nuclei_fluorescence")
    boxes = read_boxes(sample_boxes("nuclei_fluorescence"))[:repeats]
    out = {}
    for name, spec in models.items():
        predictor = BoxPredictor(spec, device=device)
        policy = interactive_policy(predictor.policy)  # the annotator's crops
        clicks, box_only = [], []
        for box in boxes:
            first = next(predictor.predict_boxes(image, box[None], policy=policy))  # encodes (or reuses) the crop
            t0 = time.perf_counter()
            next(predictor.predict_boxes(image, box[None], policy=policy))
            box_only.append(time.perf_counter() - t0)
            centre = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]])
            xy, labels, last = np.zeros((0, 2)), np.zeros(0, np.int64), first
            for k in range(max(CLICKS)):
                xy, labels = np.r_[xy, np.clip(centre + k, 0, image.shape[:2][::-1])], np.r_[labels, 1]
                t0 = time.perf_counter()
                last = next(predictor.predict_boxes(image, box[None], points=[xy], point_labels=[labels],
                                                    mask_inputs=[last.low_res_logits], crops=[last.crop]))
                clicks.append(time.perf_counter() - t0)
        out[name] = {"boxes": len(boxes), "ms_per_click_median": 1000 * float(np.median(clicks)),
                     "ms_per_box_cached_crop_median": 1000 * float(np.median(box_only)), "backend": predictor.backend}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="NAME=MODEL (registry name or weights file)")
    p.add_argument("--max-objects", type=int, default=10, help="objects per image at most (a fixed random subset; "
                   "--timing-only: the sample's boxes timed)")
    p.add_argument("--images", type=int, default=8, help="the first N held-out images per dataset")
    p.add_argument("--split", choices=("val", "train"), default="val", help="held-out images (default) or the training split's (for tuning)")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS) + tuple(OLD_NAMES), default=list(VARIANTS),
                   help="click updates to compare (the first times the box baseline)")
    p.add_argument("--crops", choices=("annotator", "batch"), default="annotator",
                   help="crop planning: the napari annotator's (interactive_policy, default) or segment()'s")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--timing-only", action="store_true", help="only time clicks, on the package's nuclei sample")
    p.add_argument("--datasets", nargs="+", default=["nuclei_dsb2018", "fundus_drishtigs"], choices=("nuclei_dsb2018", "fundus_drishtigs"))
    args = p.parse_args()
    args.variants = [OLD_NAMES.get(v, v) for v in args.variants]
    torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in args.models)
    result = {"models": models, "max_objects": args.max_objects, "images": args.images, "device": args.device, "datasets": args.datasets,
              "split": args.split, "variants": args.variants, "crops": args.crops,
              "threads": args.threads, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "result": timing_only(models, args.device, args.max_objects) if args.timing_only else
              evaluate(models, args.max_objects, args.images, args.device, tuple(args.datasets), tuple(args.variants), args.split == "val",
                       args.crops)}
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
