"""Instance quality of "segment every object" on the held-out DSB 2018 nuclei, next to the classical baseline.

Six methods in one run, on the same held-out images (scripts/prepare_device_payload.py's
``is_val`` split, which no training step saw), read at native resolution from ../shared:

- ``auto``: ``BoxPredictor.segment_auto`` with today's ``AutoOptions()`` (prompt-free nuclei
  proposals, each box through the box model);
- ``auto_main``: the same with the defaults before test-time flips (``flips`` 1: the prompt-free
  model sees each window once, as on main before 2026-12-07), to show what the flips do;
- ``auto_previous``: the same with the proposal split used before 2026-12-06 (watershed markers
  8 px apart, no joining of wide necks, no hole filling; no flips), to show what that change did;
- ``proposals``: the proposals alone (the prompt-free model's foreground, averaged over the
  flips, small holes filled, split by the watershed with wide necks joined, fragments under
  ``min_area`` dropped), to show what the box stage adds;
- ``proposals_main``: the proposals alone without flips (``flips`` 1);
- ``watershed``: Otsu threshold + distance-transform watershed (scikit-image, markers 8 px
  apart), no learning.

Per method, over all images and per modality (``dark``: dark background, fluorescence;
``light``: light background, stained or brightfield tissue; see :func:`modality`): mean
per-image F1 at IoU 0.5, pooled F1 (matches over all images), mean Dice of matched objects,
seconds per image on this machine's CPU threads.

Usage:
  python bench/eval_auto.py [--images N] [--methods auto,auto_main,...] [--box-model NAME] [--json out.json] [--proposer MODEL]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from eval_default_models import SHARED, val_items
from PIL import Image
from prepare_device_payload import light_background  # on the path through eval_default_models
from report import cpu_name, print_and_save

from hrmedseg.engine import BoxPredictor
from hrmedseg.engine.auto import AutoOptions, proposal_instances, resolve_proposer, semantic_foreground
from hrmedseg.training.metrics import match_instances, watershed_instances

# The proposal split before 2026-12-06 (docs/benchmarks.md, "Segment every object").
PREVIOUS_SPLIT = {"split_distance": 8, "neck_ratio": 2.0, "max_hole_area": 0, "flips": 1}
# The defaults on main before test-time flips (2026-12-07).
MAIN_BEFORE_FLIPS = {"flips": 1}


def modality(rgb: np.ndarray) -> str:
    """``"light"`` or ``"dark"`` background of ``rgb`` (H, W, 3) uint8 (the rule that also picks
    the oversampled images of scripts/prepare_device_payload.py --nuclei-selection)."""
    return "light" if light_background(rgb) else "dark"


def summary(rows: list[dict], seconds: float) -> dict:
    """Scores of one method over ``rows`` (match_instances results, one per image)."""
    tp, n = sum(r["tp"] for r in rows), sum(r["n_pred"] + r["n_gt"] for r in rows)
    return {
        "images": len(rows),
        "objects": int(sum(r["n_gt"] for r in rows)),
        "f1_mean": float(np.mean([r["f1"] for r in rows])),
        "f1_pooled": 2 * tp / n if n else 1.0,
        "matched_dice": float(np.nanmean([r["matched_dice"] for r in rows])),
        "seconds_per_image": seconds / len(rows),
    }


def summary_by_modality(rows: list[dict], seconds: list[float], kinds: list[str]) -> dict:
    """:func:`summary` of ``rows`` (one per image, ``seconds`` each), with one more per modality
    of ``kinds`` (each image's ``modality``) under its name."""
    result = summary(rows, sum(seconds))
    for kind in sorted(set(kinds)):
        picked = [i for i, k in enumerate(kinds) if k == kind]
        result[kind] = summary([rows[i] for i in picked], sum(seconds[i] for i in picked))
    return result


def read_rgb(item: dict) -> np.ndarray:
    """(H, W, 3) uint8 image of a manifest item."""
    return np.asarray(Image.open(SHARED / "nuclei_dsb2018" / item["image"]).convert("RGB"))


def interleaved(items: list[dict]) -> list[dict]:
    """``items`` reordered so that each modality's images are spread evenly over the list (each
    image at its fractional rank within its modality; ties: manifest order)."""
    kinds = [modality(read_rgb(it)) for it in items]
    counts = {k: kinds.count(k) for k in set(kinds)}
    seen = {k: 0 for k in counts}
    ranks = []
    for kind in kinds:
        ranks.append((seen[kind] + 0.5) / counts[kind])
        seen[kind] += 1
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (ranks[i], i))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, help="only the first N held-out images (in --order)")
    ap.add_argument("--order", choices=("manifest", "interleaved"), default="manifest",
                    help="interleaved: light-background images spread evenly among the dark ones, so any first N is modality-balanced")
    ap.add_argument("--box-model", default="hrmedseg_sam_default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--split", choices=("val", "train"), default="val",
                    help="train: the manifest's training-split items (for a manifest that lists a selection part of it)")
    ap.add_argument("--proposer", default="nuclei", help="the prompt-free model of auto/proposals (name or path)")
    ap.add_argument("--methods", help="comma-separated subset of the methods (default: all); the first is the headline row")
    ap.add_argument("--json")
    args = ap.parse_args()
    predictor = BoxPredictor(args.box_model, device=args.device)
    proposer = resolve_proposer(args.proposer, predictor.device)
    options = AutoOptions()
    previous = AutoOptions(**PREVIOUS_SPLIT)
    main_before = AutoOptions(**MAIN_BEFORE_FLIPS)
    methods = {
        "auto": lambda img: predictor.segment_auto(img, proposer=proposer, options=options)[0],
        "auto_main": lambda img: predictor.segment_auto(img, proposer=proposer, options=main_before)[0],
        "auto_previous": lambda img: predictor.segment_auto(img, proposer=proposer, options=previous)[0],
        "proposals": lambda img: proposal_instances(semantic_foreground(proposer, img, options), options),
        "proposals_main": lambda img: proposal_instances(semantic_foreground(proposer, img, main_before), main_before),
        "watershed": lambda img: watershed_instances(img),
    }
    if args.methods:
        unknown = set(args.methods.split(",")) - set(methods)
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(methods)}")
        methods = {name: methods[name] for name in args.methods.split(",")}
    rows: dict[str, list[dict]] = {name: [] for name in methods}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    kinds: list[str] = []
    items = val_items("nuclei_dsb2018", val=args.split == "val")
    if args.order == "interleaved":
        items = interleaved(items)
    items = items[: args.images]
    for item in items:
        image = read_rgb(item)
        gt = np.asarray(Image.open(SHARED / "nuclei_dsb2018" / item["mask"]))
        kinds.append(modality(image))
        for name, run in methods.items():
            predictor.clear_cache()
            t0 = time.perf_counter()
            labels = run(image)
            seconds[name].append(time.perf_counter() - t0)
            rows[name].append(match_instances(labels, gt))
        # One line per image on stderr: a run stopped early can still be summed up.
        print(json.dumps({"image": item["name"], "kind": kinds[-1], **{
            name: {k: rows[name][-1][k] for k in ("tp", "n_pred", "n_gt")} | {"s": round(seconds[name][-1], 2)} for name in methods}}),
            file=sys.stderr, flush=True)
    result: dict = {"images": len(items), "objects": int(sum(r["n_gt"] for r in next(iter(rows.values())))), "cpu": cpu_name(),
                    "threads": torch.get_num_threads(), "box_model": args.box_model,
                    "proposer": args.proposer, "split": args.split}
    for name, rs in rows.items():
        result[name] = summary_by_modality(rs, seconds[name], kinds)
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
