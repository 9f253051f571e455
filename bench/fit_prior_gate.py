"""Fit a box model's prior gate (the box prior rule "gate") on its TRAINING split, never on is_val.

For each training-split object, prompted with its tight box through the engine (prior "model"),
this records the gate's features (``hrmedseg.models.prior_gate.gate_features`` of the low-res
logits the engine returns) and two native-resolution Dice values: of the model's mask and of the
engine's inscribed ellipse (what prior "ellipse" returns). Rows are cached per dataset in
``--cache`` (an .npz each), so refitting costs nothing. The gate is a logistic model of "the
ellipse has the higher Dice", each object weighted by the Dice the choice is worth,
|Dice(ellipse) - Dice(model)|, divided by its group's size (nuclei, optic disc, optic cup count
alike, as the targets do), with a small L2 penalty; fitted with scipy's L-BFGS. Printed: the
training split's mean Dice per group for model / ellipse / gate / oracle, in-sample and by 5-fold
cross-validation over images. ``--write`` saves the gate as JSON beside the weights file
(``<weights>.prior_gate.json``), where the loader finds it.

Usage:
  python bench/fit_prior_gate.py [MODEL] [--nuclei-images 120] [--max-objects 10] [--cache runs/prior_gate] [--write]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from eval_default_models import dice_iou
from eval_zero_shot import paste, prompts
from report import cpu_name
from scipy.optimize import minimize

from hrmedseg.models.prior_gate import GATE_FEATURES, PriorGate, gate_features, gate_path

GROUPS = ("nuclei", "disc", "cup")
L2 = 1e-2  # on standardised features: keeps the weights small where an object class is rare


def collect(model: str, dataset: str, max_images: int | None, max_objects: int | None) -> dict[str, np.ndarray]:
    """Per training-split object: features (N, F), Dice of the model's mask and of the ellipse, group, image."""
    from hrmedseg.engine import BoxPredictor
    from hrmedseg.engine.crops import logits_to_native_batch
    from hrmedseg.models.box_prior import ellipse_prior_logits

    predictor = BoxPredictor(model, device="cpu", prior="model")
    rows: dict[str, list] = {"features": [], "dice_model": [], "dice_ellipse": [], "group": [], "image": []}
    for k, (name, image, objs) in enumerate(prompts(dataset, max_objects, max_images, val=False)):
        boxes = np.stack([box for _, box in objs])
        for j, (obj, (m, box)) in enumerate(zip(predictor.predict_boxes(image, boxes), objs)):
            crop, size = obj.crop, (obj.crop.input_size, obj.crop.input_size)
            logits = obj.low_res_logits.reshape(1, 1, *obj.low_res_logits.shape[-2:]).float()
            input_box = torch.from_numpy(crop.box_to_input(box[None]))
            ellipse = ellipse_prior_logits(input_box, logits.shape[-2:], size)
            rows["features"].append(gate_features(logits, torch.tensor([obj.score]), input_box, size, ellipse)[0].numpy())
            ellipse_mask = logits_to_native_batch(ellipse, crop, [obj.region])[0]
            rows["dice_model"].append(dice_iou(paste(obj, m.shape), m)[0])
            rows["dice_ellipse"].append(dice_iou(paste(SimpleNamespace(region=obj.region, mask=ellipse_mask), m.shape), m)[0])
            rows["group"].append(0 if dataset.startswith("nuclei") else 1 + j % 2)  # fundus: disc, cup
            rows["image"].append(name)
        print(f"{dataset}: {k + 1} images, {len(rows['group'])} objects", flush=True)
    return {k: np.asarray(v) for k, v in rows.items()}


def load_rows(model: str, cache: Path, nuclei_images: int | None, max_objects: int | None) -> dict[str, np.ndarray]:
    """Both datasets' rows, from ``cache`` when it holds them for these settings."""
    parts = []
    for dataset, images in (("nuclei_dsb2018", nuclei_images), ("fundus_drishtigs", None)):
        path = cache / f"{Path(model).stem}_{dataset}_{images}_{max_objects}.npz"
        if not path.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            np.savez(path, **collect(model, dataset, images, max_objects))
        parts.append(dict(np.load(path)))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def fit(x: np.ndarray, better_ellipse: np.ndarray, weight: np.ndarray) -> PriorGate:
    """Weighted, L2-penalised logistic regression on standardised features."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mean) / std, np.ones(len(x))]
    y, w = better_ellipse.astype(float), weight / weight.sum()

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = z @ theta
        p = 1 / (1 + np.exp(-t))
        value = np.sum(w * (np.logaddexp(0, t) - y * t)) + L2 * np.sum(theta[:-1] ** 2)
        grad = z.T @ (w * (p - y)) + np.r_[2 * L2 * theta[:-1], 0]
        return value, grad

    theta = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x
    return PriorGate(tuple(map(float, theta[:-1])), float(theta[-1]), tuple(map(float, mean)), tuple(map(float, std)))


def weights_of(rows: dict[str, np.ndarray]) -> np.ndarray:
    """|Dice(ellipse) - Dice(model)| over the object's group size: each group counts alike."""
    counts = np.bincount(rows["group"], minlength=len(GROUPS))
    return np.abs(rows["dice_ellipse"] - rows["dice_model"]) / counts[rows["group"]]


def scores(rows: dict[str, np.ndarray], use_ellipse: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean Dice per group of the model, the ellipse, the choice ``use_ellipse`` and the oracle."""
    dm, de = rows["dice_model"], rows["dice_ellipse"]
    choices = {"model": dm, "ellipse": de, "gate": np.where(use_ellipse, de, dm), "oracle": np.maximum(dm, de)}
    return {g: {k: round(float(v[rows["group"] == i].mean()), 4) for k, v in choices.items()} for i, g in enumerate(GROUPS)}


def cross_validate(rows: dict[str, np.ndarray], folds: int = 5) -> np.ndarray:
    """Out-of-fold gate choices, folds by image (an image's objects stay together)."""
    images = np.unique(rows["image"])
    fold_of = dict(zip(images, np.random.default_rng(0).permutation(len(images)) % folds))
    fold = np.array([fold_of[n] for n in rows["image"]])
    out = np.zeros(len(fold), bool)
    w = weights_of(rows)
    better = rows["dice_ellipse"] > rows["dice_model"]
    for f in range(folds):
        gate = fit(rows["features"][fold != f], better[fold != f], w[fold != f])
        out[fold == f] = gate.prob_ellipse(torch.from_numpy(rows["features"][fold == f]).float()).numpy() > 0.5
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="src/hrmedseg/weights/default/hrmedseg_sam_default.pt")
    p.add_argument("--nuclei-images", type=int, default=120, help="the first N training-split DSB images (all: 0)")
    p.add_argument("--max-objects", type=int, default=10, help="objects per image at most (a fixed random subset)")
    p.add_argument("--cache", default="runs/prior_gate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="save the gate beside the weights file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = load_rows(args.model, Path(args.cache), args.nuclei_images or None, args.max_objects)
    better = rows["dice_ellipse"] > rows["dice_model"]
    gate = fit(rows["features"], better, weights_of(rows))
    in_sample = gate.prob_ellipse(torch.from_numpy(rows["features"]).float()).numpy() > 0.5
    provenance = {
        "fitted_on": "training split (not is_val) of DSB 2018 (first %s images) and Drishti-GS (all), at most %d "
                     "objects per image, tight boxes" % (args.nuclei_images or "all", args.max_objects),
        "objects": {g: int((rows["group"] == i).sum()) for i, g in enumerate(GROUPS)},
        "command": "python bench/fit_prior_gate.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
        "training_split_dice": scores(rows, in_sample), "cross_validated_dice": scores(rows, cross_validate(rows)),
    }
    gate = PriorGate(gate.weights, gate.bias, gate.mean, gate.std, GATE_FEATURES, provenance)
    print(json.dumps(gate.to_dict(), indent=1))
    if args.write:
        from hrmedseg.atomic import atomic_path

        with atomic_path(gate_path(args.model)) as tmp:
            tmp.write_text(json.dumps(gate.to_dict(), indent=1) + "\n")
        print("wrote", gate_path(args.model))


if __name__ == "__main__":
    main()
