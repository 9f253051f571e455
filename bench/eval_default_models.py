"""Held-out quality of the default models on real annotated images, at native resolution.

Box prompts (HRMedSegSAM through the engine, as users run it): per-object Dice and IoU, each
object prompted with its tight bounding box, against the ellipse inscribed in that box (the
strongest prompt-free trick); and how well the score the engine reports (the decoder's predicted
IoU) tells good masks from bad: its Spearman and Pearson correlation with the actual per-object
IoU, and its mean absolute error. Prompt-free (HRMedSeg): Dice and IoU per class.

Held-out images are those of scripts/prepare_device_payload.py's split (val); fundus photos are
read at native resolution from ../shared (never from the repository).

Usage:
  python bench/eval_default_models.py box MODEL.pt [--limit N]
  python bench/eval_default_models.py semantic-nuclei MODEL.pt
  python bench/eval_default_models.py semantic-fundus MODEL.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.draw import ellipse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from prepare_device_payload import is_val  # noqa: E402  the split lives in one place

from hrmedseg.training.metrics import otsu_foreground  # noqa: E402

# HRMEDSEG_SHARED_DATA: another folder of the same layout (the device machine has no ../shared).
SHARED = Path(os.environ.get("HRMEDSEG_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    inter = np.logical_and(pred, gt).sum()
    total = pred.sum() + gt.sum()
    union = np.logical_or(pred, gt).sum()
    return (2 * inter / total if total else 1.0), (inter / union if union else 1.0)


def val_items(dataset: str, val: bool = True) -> list[dict]:
    """The manifest items of the held-out split (``val=False``: of the training split)."""
    manifest = json.loads((SHARED / dataset / "manifest.json").read_text())
    return [it for it in manifest["items"] if is_val(it["name"]) == val]


def objects(dataset: str, mask: np.ndarray) -> list[np.ndarray]:
    """Binary masks of the objects to prompt: nuclei instances, or the optic disc and cup."""
    if dataset == "fundus_drishtigs":
        return [mask >= 1, mask == 2]
    return [mask == i for i in np.unique(mask) if i]


def tight_box(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def ellipse_in_box(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    out = np.zeros(shape, bool)
    rr, cc = ellipse((y0 + y1) / 2 - 0.5, (x0 + x1) / 2 - 0.5, (y1 - y0) / 2, (x1 - x0) / 2, shape=shape)
    out[rr, cc] = True
    return out


def eval_box(model_path: str, limit: int | None, backend: str = "auto") -> dict:
    from hrmedseg.engine import BoxPredictor

    predictor = BoxPredictor(model_path, device="auto", backend=backend)
    results = {}
    for dataset in ("nuclei_dsb2018", "fundus_drishtigs"):
        ours, base, names, scores = [], [], [], []
        t0 = time.perf_counter()
        for item in val_items(dataset)[:limit]:
            image = np.asarray(Image.open(SHARED / dataset / item["image"]).convert("RGB"))
            mask = np.asarray(Image.open(SHARED / dataset / item["mask"]))
            objs = [m for m in objects(dataset, mask) if m.sum() >= 4]
            boxes = np.stack([tight_box(m) for m in objs])
            for m, box, obj in zip(objs, boxes, predictor.predict_boxes(image, boxes)):
                pred = np.zeros(mask.shape, bool)
                y0, y1, x0, x1 = obj.region
                pred[y0:y1, x0:x1] = obj.mask
                ours.append(dice_iou(pred, m))
                scores.append(obj.score)
                base.append(dice_iou(ellipse_in_box(box, mask.shape), m))
                names.append(item["name"])
        ours_a, base_a = np.array(ours), np.array(base)
        entry = {
            "images": len(set(names)), "objects": len(ours),
            "dice": float(ours_a[:, 0].mean()), "iou": float(ours_a[:, 1].mean()),
            "ellipse_dice": float(base_a[:, 0].mean()), "ellipse_iou": float(base_a[:, 1].mean()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        entry.update(score_quality(np.array(scores), ours_a[:, 1]))
        if dataset == "fundus_drishtigs":
            entry["disc_dice"] = float(ours_a[0::2, 0].mean())
            entry["cup_dice"] = float(ours_a[1::2, 0].mean())
        results[dataset] = entry
    return results


def score_quality(scores: np.ndarray, iou: np.ndarray) -> dict:
    """The predicted IoU ("score") against the actual per-object IoU: rank and linear correlation, MAE,
    and the mean actual IoU of the 10% lowest-scored objects against the other 90% (does a low score
    point at a bad mask?)."""
    from scipy.stats import pearsonr, spearmanr

    constant = np.ptp(scores) == 0 or np.ptp(iou) == 0  # no correlation is defined
    low = scores <= np.quantile(scores, 0.1)
    return {
        "iou_lowest_score_decile": float(iou[low].mean()),
        "iou_other_objects": float(iou[~low].mean()) if (~low).any() else float("nan"),
        "score_spearman": float("nan") if constant else float(spearmanr(scores, iou).statistic),
        "score_pearson": float("nan") if constant else float(pearsonr(scores, iou).statistic),
        "score_mae": float(np.abs(scores - iou).mean()),
        "score_mean": float(scores.mean()),
    }


def eval_semantic(model_path: str, dataset: str) -> dict:
    from hrmedseg.engine.semantic import SemanticPredictor

    predictor = SemanticPredictor(model_path, device="auto")
    scores: dict[str, list] = {}
    for item in val_items(dataset):
        image = np.asarray(Image.open(SHARED / dataset / item["image"]).convert("RGB"))
        mask = np.asarray(Image.open(SHARED / dataset / item["mask"]))
        prob = 1 / (1 + np.exp(-predictor.predict_logits(image)))
        if dataset == "fundus_drishtigs":
            targets = {"disc": mask >= 1, "cup": mask == 2}
        else:
            targets = {"nucleus": mask > 0}
        for c, (name, gt) in enumerate(targets.items()):
            scores.setdefault(name, []).append(dice_iou(prob[c] > 0.5, gt))
        if dataset == "nuclei_dsb2018":  # the simple baseline: Otsu's threshold on the grey image
            scores.setdefault("nucleus_otsu_baseline", []).append(dice_iou(otsu_foreground(image, auto_polarity=True), targets["nucleus"]))
    return {name: {"images": len(v), "dice": float(np.mean([d for d, _ in v])), "iou": float(np.mean([i for _, i in v]))}
            for name, v in scores.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["box", "semantic-nuclei", "semantic-fundus"])
    p.add_argument("model")
    p.add_argument("--limit", type=int, help="first N held-out images per dataset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto", help="box task: engine backend (auto, fast, fast-bf16, reference)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.task == "box":
        result = eval_box(args.model, args.limit, args.backend)
    else:
        result = eval_semantic(args.model, "nuclei_dsb2018" if args.task == "semantic-nuclei" else "fundus_drishtigs")
    print(json.dumps({"task": args.task, "model": args.model, "result": result}, indent=1))


if __name__ == "__main__":
    main()
