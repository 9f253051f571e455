"""Tune the native click fix (hrmedseg.engine.click_update.ClickFix) on DSB *training* nuclei.

One predictor, the variants switched per object on the same cached crop; bench_clicks.py's
simulated annotator, with the annotator's crops (``interactive_policy``; ``--crops batch``:
``segment()``'s). Prints Dice after the box / 1 / 3 / 5 clicks and ms per click per variant.
"disc" variants are the depth disc of ``ClickFix``; "fade" ones its fade (``fade=True``).

Usage: cd bench && HRMEDSEG_SHARED_DATA=... python tune_click_fix.py [--images 6] [--max-objects 5] [--model hrmedseg_sam_default]
  (the fade of hrmedseg_sam_default.click_fix.json: --images 40 --max-objects 8 --only "disc r3.0 cap0.5" "fade 0.15" "fade 0.25"
   "fade 0.35" "fade 0.5", then --only "fade 0.35" "fade 0.35 p0.5" "fade 0.35 p2.0" "fade 0.5 p2.0")
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_clicks import CLICKS, refine
from eval_zero_shot import prompts

from hrmedseg.engine.click_update import ClickFix, check_click_update

# name -> (click_update, ClickFix or None)
GRID = {
    "local (the default before)": ("local", None),
    **{f"disc r{r} cap{c}": ("pixel", ClickFix(r, max_radius=c)) for r in (1.5, 2.0, 3.0) for c in (0.25, 0.5, 1.0)},
    **{f"fade {c}": ("pixel", ClickFix(max_radius=c, fade=True)) for c in (0.15, 0.25, 0.35, 0.5)},
    **{f"fade {c} p{pw}": ("pixel", ClickFix(max_radius=c, fade=True, fade_power=pw)) for c in (0.35, 0.5) for pw in (0.5, 2.0)},
    **{f"fade 0.35 p0.5 m{m}": ("pixel", ClickFix(max_radius=0.35, fade=True, fade_power=0.5, margin=m)) for m in (0.5, 1.0)},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="hrmedseg_sam_default")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--max-objects", type=int, default=5)
    p.add_argument("--dataset", default="nuclei_dsb2018")
    p.add_argument("--only", nargs="*", help="variant names to run (default all)")
    p.add_argument("--crops", choices=("annotator", "batch"), default="annotator")
    p.add_argument("--max-upscale", type=float, nargs="+", help="annotator crops: largest upscales to compare (default the annotator's)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0], help="mask thresholds (logits) to compare")
    args = p.parse_args()
    torch.set_num_threads(2)
    from dataclasses import replace

    from hrmedseg.engine import BoxPredictor, interactive_policy

    grid = {k: v for k, v in GRID.items() if not args.only or k in args.only}
    predictor = BoxPredictor(args.model, device="cpu")
    if args.crops == "batch":
        policies = {"": None}
    else:
        base = interactive_policy(predictor.policy)
        ups = args.max_upscale or [base.max_upscale]
        policies = {f" up{u:g}" if args.max_upscale else "": replace(base, max_upscale=u) for u in ups}
    rows = {(f"{name}{pn}" + (f" t{t:g}" if len(args.thresholds) > 1 else ""), name, pn, t): ([], [])
            for name in grid for pn in policies for t in args.thresholds}
    for _, image, objs in prompts(args.dataset, args.max_objects, args.images, val=False):
        for gt, box in objs:
            for (_, name, pn, t), (dice, seconds) in rows.items():
                update, fix = grid[name]
                predictor.click_update, predictor.click_fix, predictor.mask_threshold = check_click_update(update), fix, t
                d, s = refine(predictor, image, gt, box, True, policies[pn])
                dice.append(d)
                seconds.extend(s)
        predictor.clear_cache()
    for (label, *_), (dice, seconds) in rows.items():
        d = np.array(dice).mean(0)
        print(f"{label:36s} n={len(dice)} box {d[0]:.4f} " + " ".join(f"{c}:{d[c]:.4f}" for c in CLICKS)
              + f"  ms/click {1000 * np.median(seconds):.1f}", flush=True)


if __name__ == "__main__":
    main()
