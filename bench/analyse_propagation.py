"""Where neighbour propagation loses against per-slice boxes, per object, on stardist's 3D nuclei stack.

Same data and prompts as ``bench_propagation.py`` (one tight box on each object's middle slice).
For each variant of the neighbour rules (``propagate`` keywords) and each object: the slices of
the object it reached and missed each way, why each chain stopped, the slices it labelled where
the object is not (false slices), per-slice Dice where it ran, and how the derived box grows
against the object's tight box. Also, per variant, the 3D Dice it would have if its stops were
perfect (its masks kept on the object's slices only): what segmentation alone loses.

Guard against tuning to the test: figures come per half (even / odd label ids); settings are
chosen on the even half and the odd half is reported as held out.

Usage:
  python bench/analyse_propagation.py --wheel DIR/stardist-*.whl [--model hrmedseg_sam_default]
      [--variants NAME ...] [--device cpu] [--threads 2] [--json out.json] [--per-object]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_propagation import dice, middle_slices, per_slice_boxes, tight_box  # noqa: E402
from propagation_data import read_stardist_wheel  # noqa: E402

from hrmedseg.engine import BoxPredictor  # noqa: E402
from hrmedseg.engine.propagation import SlicePrompt, propagate  # noqa: E402

#: name -> propagate keywords (the defaults of the day are "before": click, grow 0.05, min_score 0.7)
VARIANTS: dict[str, dict] = {
    "before": dict(click=True, grow=0.05, min_score=0.7, min_relative_score=0.0),
    "no_click": dict(click=False, grow=0.05, min_score=0.7, min_relative_score=0.0),
    "no_click_no_score": dict(click=False, grow=0.05, min_score=0.0, min_relative_score=0.0),
    "click_no_score": dict(click=True, grow=0.05, min_score=0.0, min_relative_score=0.0),
    "no_click_rel0.9": dict(click=False, grow=0.05, min_score=0.0, min_relative_score=0.9),
    "no_click_rel0.8": dict(click=False, grow=0.05, min_score=0.0, min_relative_score=0.8),
    "no_click_grow0": dict(click=False, grow=0.0, min_score=0.7, min_relative_score=0.0),
    "no_click_grow0.1": dict(click=False, grow=0.1, min_score=0.7, min_relative_score=0.0),
    "no_click_growth": dict(click=False, min_score=0.7, min_overlap=0.5, max_growth=1.2),
    "click_rel_growth": dict(click=True, min_score=0.0, min_relative_score=0.8, min_overlap=0.5, max_growth=1.2),
    "no_click_rel_growth": dict(click=False, min_score=0.0, min_relative_score=0.9, min_overlap=0.5, max_growth=1.2),
}


def grid() -> dict[str, dict]:
    """A grid of neighbour rules: click or not, box growth, stop rule (absolute / relative score), overlap."""
    out = {}
    for click in (True, False):
        for grow in (0.0, 0.05, 0.1, 0.2):
            for score, rel in ((0.7, 0.0), (0.5, 0.0), (0.0, 0.8), (0.0, 0.9), (0.0, 0.95), (0.0, 0.0)):
                for overlap in (0.3, 0.5):
                    name = f"click{int(click)}_grow{grow}_score{score}_rel{rel}_ov{overlap}"
                    out[name] = dict(click=click, grow=grow, min_score=score, min_relative_score=rel, min_overlap=overlap)
    return out


def object_report(labels: np.ndarray, gt: np.ndarray, oid: int, mid: int, stops: dict, gt_slices: set[int]) -> dict:
    """Per-object diagnostics of one propagation result (see the module docstring)."""
    have = {int(z) for z in np.nonzero((labels == oid).any(axis=(1, 2)))[0]}
    both = sorted(have & gt_slices)
    per_slice = [dice(labels[z] == oid, gt[z] == oid) for z in both]
    growth = []
    for z in both:
        ours, true = tight_box(labels[z] == oid), tight_box(gt[z] == oid)
        growth.append(((ours[2] - ours[0]) * (ours[3] - ours[1])) / ((true[2] - true[0]) * (true[3] - true[1])))
    kept = labels == oid
    kept[[z for z in range(len(labels)) if z not in gt_slices]] = False
    return {
        "id": oid, "mid": mid, "gt": [min(gt_slices), max(gt_slices)],
        "reached_up": sum(1 for z in gt_slices if z > mid and z in have), "of_up": sum(1 for z in gt_slices if z > mid),
        "reached_down": sum(1 for z in gt_slices if z < mid and z in have), "of_down": sum(1 for z in gt_slices if z < mid),
        "false_slices": len(have - gt_slices), "missed": len(gt_slices - have),
        "stop_up": stops.get(1, (None, "none"))[1], "stop_down": stops.get(-1, (None, "none"))[1],
        "slice_dice": float(np.mean(per_slice)) if per_slice else 0.0,
        "box_area_ratio": float(np.mean(growth)) if growth else float("nan"),
        "dice3d": dice(labels == oid, gt == oid), "dice3d_perfect_stops": dice(kept, gt == oid),
    }


def summarise(rows: list[dict]) -> dict:
    """Means over objects, overall and per half (even / odd ids)."""
    def mean(key: str, sub: list[dict]) -> float:
        return float(np.nanmean([r[key] for r in sub]))

    out: dict = {}
    for half, sub in (("all", rows), ("even", [r for r in rows if r["id"] % 2 == 0]), ("odd", [r for r in rows if r["id"] % 2])):
        if not sub:
            continue
        out[half] = {k: round(mean(k, sub), 3) for k in ("dice3d", "dice3d_perfect_stops", "slice_dice", "missed", "false_slices", "box_area_ratio")}
        out[half]["n"] = len(sub)
    out["stops"] = dict(Counter(r["stop_up"] for r in rows) + Counter(r["stop_down"] for r in rows))
    reach = sum(r["reached_up"] + r["reached_down"] for r in rows)
    out["reached_fraction"] = round(reach / max(sum(r["of_up"] + r["of_down"] for r in rows), 1), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", required=True)
    ap.add_argument("--model", default="hrmedseg_sam_default")
    ap.add_argument("--variants", nargs="*", default=None, help="names in VARIANTS (default: all, or none when --rules are given)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rules", nargs="*", default=[], help="NAME=JSON: extra variants, propagate keywords as JSON")
    ap.add_argument("--grid", action="store_true", help="run grid() instead of --variants")
    ap.add_argument("--per-object", action="store_true", help="print every object's row of the first variant")
    ap.add_argument("--half", choices=("all", "even", "odd"), default="all", help="propagate only these label ids (choose settings on one half)")
    ap.add_argument("--no-upper", action="store_true", help="skip the per-slice-box pass")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image, gt = read_stardist_wheel(args.wheel)
    ids = sorted(int(i) for i in np.unique(gt) if i)
    if args.half != "all":
        ids = [i for i in ids if i % 2 == (args.half == "odd")]
    middle = middle_slices(gt, ids)
    gt_slices = {oid: {int(z) for z in np.nonzero((gt == oid).any(axis=(1, 2)))[0]} for oid in ids}
    prompts = [SlicePrompt(z, oid, box=tight_box(gt[z] == oid)) for oid, z in middle.items()]
    predictor = BoxPredictor(args.model, device=args.device)
    extra = []
    for spec in args.rules:
        name, _, rules = spec.partition("=")
        VARIANTS[name] = json.loads(rules)
        extra.append(name)
    args.variants = (args.variants or ([] if extra else list(VARIANTS)[: len(VARIANTS) - len(extra)])) + extra
    if args.grid:
        VARIANTS.update(grid())
        args.variants = list(grid())
    out: dict = {"model": args.model, "objects": len(ids), "variants": {}}
    # the embedding cache is kept between variants: they differ only in decoder calls and crops
    t0 = time.perf_counter()
    if not args.no_upper:
        upper, _ = per_slice_boxes(predictor, image, gt, ids)
        out["per-slice boxes"] = summarise([object_report(upper, gt, oid, middle[oid], {}, gt_slices[oid]) for oid in ids])
        print("per-slice boxes", json.dumps(out["per-slice boxes"]), f"{time.perf_counter() - t0:.0f}s", flush=True)
    for name in args.variants:
        t0 = time.perf_counter()
        result = propagate(predictor, image, prompts, **VARIANTS[name])
        rows = [object_report(result.labels, gt, oid, middle[oid], result.stops.get(oid, {}), gt_slices[oid]) for oid in ids]
        out["variants"][name] = {"rules": VARIANTS[name], "summary": summarise(rows), "objects": rows}
        print(name, json.dumps(out["variants"][name]["summary"]), f"{time.perf_counter() - t0:.0f}s", flush=True)
        if args.per_object and name == args.variants[0]:
            for r in rows:
                print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
