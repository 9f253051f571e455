"""``AutoOptions.agree_iou`` swept on one set of DSB images, proposals and box masks computed once.

``segment_auto`` keeps the box model's mask of a prompt-free proposal only where that mask's IoU
with the proposal's own mask is at least ``agree_iou`` (:meth:`ProposalMask.choose`). This script
proposes every image's objects once, runs the box model once on their boxes, then applies each
threshold and scores the labels like ``eval_auto.py`` (pooled F1 at IoU 0.5, matched Dice, per
modality). Choose on a selection split (``--split train`` with a manifest of training images, e.g.
device_payload/data_nuc/sel_shared), never on the held-out split.

Usage:
  HRMEDSEG_SHARED_DATA=device_payload/data_nuc/sel_shared python bench/sweep_agree_iou.py --split train \
      --values 0.5,0.7,0.8,0.9,1.01 [--images N] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from eval_auto import modality, read_rgb, summary_by_modality
from eval_default_models import SHARED, val_items
from PIL import Image
from report import print_and_save

from hrmedseg.engine import BoxPredictor
from hrmedseg.engine.auto import AutoOptions, chosen_masks, propose_objects, resolve_proposer
from hrmedseg.engine.predictor import paste_objects
from hrmedseg.io import open_image
from hrmedseg.training.metrics import match_instances


def labels_at(objects: list, proposals: list, shape_yx: tuple[int, int], agree_iou: float) -> np.ndarray:
    """(H, W) int32 labels of ``segment_auto`` with this threshold, from its box-model ``objects``."""
    return paste_objects(chosen_masks(objects, proposals, agree_iou), shape_yx, overlap="keep_existing")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", default="0.5,0.7,0.8,0.9,1.01", help="comma-separated agree_iou values (above 1: the proposals' masks)")
    ap.add_argument("--split", choices=("val", "train"), default="train")
    ap.add_argument("--images", type=int)
    ap.add_argument("--box-model", default="hrmedseg_sam_default")
    ap.add_argument("--proposer", default="nuclei")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    values = [float(v) for v in args.values.split(",")]
    predictor = BoxPredictor(args.box_model, device=args.device)
    proposer = resolve_proposer(args.proposer, predictor.device)
    options = AutoOptions()
    rows: dict[float, list[dict]] = {v: [] for v in values}
    kinds: list[str] = []
    for item in val_items("nuclei_dsb2018", val=args.split == "val")[: args.images]:
        rgb = read_rgb(item)
        gt = np.asarray(Image.open(SHARED / "nuclei_dsb2018" / item["mask"]))
        kinds.append(modality(rgb))
        predictor.clear_cache()
        image = open_image(rgb)
        boxes, proposals = propose_objects(predictor, image, proposer, options)
        objects = list(predictor.predict_boxes(image, boxes))
        for v in values:
            rows[v].append(match_instances(labels_at(objects, proposals, image.shape_yx, v), gt))
        print(item["name"], kinds[-1], {v: rows[v][-1]["tp"] for v in values}, file=sys.stderr, flush=True)
    result: dict = {"split": args.split, "shared": str(SHARED), "box_model": args.box_model, "proposer": args.proposer}
    for v, rs in rows.items():
        result[f"agree_iou {v}"] = summary_by_modality(rs, [0.0] * len(rs), kinds)  # not timed
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
