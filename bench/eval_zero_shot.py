"""Box-prompt quality and CPU time per box of several models in one run, on the held-out split.

Every model runs through the engine (``BoxPredictor``: a crop per box at the model's input size,
masks at native resolution), each object prompted with its tight box, against the ellipse
inscribed in that box. Nuclei: per-object Dice on the held-out DSB 2018 images; fundus: optic
disc and cup Dice on the held-out Drishti-GS photographs at native resolution (read from
../shared, never from the repository). Time per box: wall time of ``predict_boxes`` on a fresh
image (empty embedding cache) divided by its boxes, on this machine's CPU threads.

Usage:
  python bench/eval_zero_shot.py NAME=MODEL [NAME=MODEL ...] [--max-objects 20] [--images N] [--json out.json]

MODEL is a registry name (``litemedsam``, ``hrmedseg_sam_default``) or a weights file, optionally
with ``@RULE``, the engine's box-prior rule (``BoxPredictor(prior=...)``: model, ellipse, auto, gate). The split
is scripts/prepare_device_payload.py's (``is_val``), the one no training or distillation step saw.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from eval_default_models import SHARED, dice_iou, ellipse_in_box, objects, tight_box, val_items
from PIL import Image
from report import cpu_name, print_and_save


def prompts(dataset: str, max_objects: int | None, max_images: int | None = None, seed: int = 0, val: bool = True):
    """(name, image, [(object mask, tight box)]) of the held-out images (``val=False``: the
    training split's; the first ``max_images``); at most ``max_objects`` objects each."""
    rng = np.random.default_rng(seed)
    for item in val_items(dataset, val)[:max_images]:
        image = np.asarray(Image.open(SHARED / dataset / item["image"]).convert("RGB"))
        mask = np.asarray(Image.open(SHARED / dataset / item["mask"]))
        objs = [m for m in objects(dataset, mask) if m.sum() >= 4]
        if max_objects and len(objs) > max_objects:
            objs = [objs[i] for i in sorted(rng.choice(len(objs), max_objects, replace=False))]
        yield item["name"], image, [(m, tight_box(m)) for m in objs]


def paste(obj, shape) -> np.ndarray:
    pred = np.zeros(shape, bool)
    y0, y1, x0, x1 = obj.region
    pred[y0:y1, x0:x1] = obj.mask
    return pred


def evaluate(models: dict[str, str], max_objects: int | None, device: str, max_images: int | None = None,
             oracle: tuple[str, str] | None = None) -> dict:
    """Mean Dice (and seconds per box) of each model; ``oracle`` (two of the names): also their
    per-object best, max(Dice of one, Dice of the other)."""
    from hrmedseg.engine import BoxPredictor

    def predictor(spec: str) -> BoxPredictor:
        model, _, prior = spec.partition("@")
        return BoxPredictor(model, device=device, prior=prior or "model")

    predictors = {name: predictor(spec) for name, spec in models.items()}
    results: dict = {}
    for dataset in ("nuclei_dsb2018", "fundus_drishtigs"):
        dice: dict[str, list[float]] = {name: [] for name in (*predictors, "ellipse")}
        seconds = dict.fromkeys(predictors, 0.0)
        n_images = 0
        for _, image, objs in prompts(dataset, max_objects, max_images):
            n_images += 1
            boxes = np.stack([box for _, box in objs])
            for m, box in objs:
                dice["ellipse"].append(dice_iou(ellipse_in_box(box, m.shape), m)[0])
            for name, predictor in predictors.items():
                predictor.clear_cache()
                t0 = time.perf_counter()
                masks = list(predictor.predict_boxes(image, boxes))  # a generator: time the work, not its creation
                seconds[name] += time.perf_counter() - t0
                dice[name].extend(dice_iou(paste(obj, m.shape), m)[0] for obj, (m, _) in zip(masks, objs))
        if oracle:
            dice["oracle"] = list(np.maximum(dice[oracle[0]], dice[oracle[1]]))
        entry: dict = {"images": n_images, "objects": len(dice["ellipse"])}
        for name, values in dice.items():
            values = np.array(values)
            row = {"dice": float(values.mean())}
            if dataset == "fundus_drishtigs":  # objects alternate disc, cup
                row.update(disc_dice=float(values[0::2].mean()), cup_dice=float(values[1::2].mean()))
            if name in seconds:
                row["seconds_per_box"] = seconds[name] / len(values)
            entry[name] = row
        results[dataset] = entry
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="NAME=MODEL (registry name or weights file)")
    p.add_argument("--max-objects", type=int, default=20, help="objects per image at most (a fixed random subset)")
    p.add_argument("--images", type=int, help="the first N held-out images per dataset (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--oracle", help="A,B: also the per-object best of the models named A and B")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in args.models)
    if {"ellipse", "oracle"} & set(models):
        p.error("the names 'ellipse' and 'oracle' are the run's own rows; name the models otherwise")
    result = {"models": models, "max_objects": args.max_objects, "device": args.device, "threads": args.threads,
              "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "images": args.images, "result": evaluate(models, args.max_objects, args.device, args.images,
                                 tuple(args.oracle.split(",")) if args.oracle else None)}
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
