"""The prompt-free model's time with the ECM-Decoder's pooling as it is and as it was, in one run.

"As it was" (the baseline): ``avg_pool2d`` with a k x k window on the maps that
``tokens.transpose(1, 2).reshape(b, c, h, w)`` gives, which PyTorch's CPU pooling does not treat
as channels-last when B = 1. "As it is": a k x 1 then 1 x k average on a channels-last view
(:func:`hrmedseg.models.ecm_decoder.box_mean`, :func:`~hrmedseg.models.ecm_decoder.apply_on_grid`).
Both are timed on the same images, alternating, with ``SemanticPredictor.predict_logits``
(the bundled ``hrmedseg_nuclei``), and the largest logit difference between them is printed.

    .venv/bin/python bench/bench_ecm_pooling.py --threads 2 --images 8
"""

from __future__ import annotations

import argparse
import contextlib
import time
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from eval_default_models import SHARED, val_items
from PIL import Image
from report import cpu_name, print_and_save

from hrmedseg.engine.semantic import SemanticPredictor
from hrmedseg.models import ecm_decoder


def _square_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)


def _reshaped_grid(module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    b, n, c = tokens.shape
    return module(tokens.transpose(1, 2).reshape(b, c, *grid)).flatten(2).transpose(1, 2)


@contextlib.contextmanager
def pooling_as_it_was():
    saved = ecm_decoder.box_mean, ecm_decoder.apply_on_grid
    ecm_decoder.box_mean, ecm_decoder.apply_on_grid = _square_pool, _reshaped_grid
    try:
        yield
    finally:
        ecm_decoder.box_mean, ecm_decoder.apply_on_grid = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=8, help="the first N held-out DSB images")
    ap.add_argument("--model", default="hrmedseg_nuclei")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    predictor = SemanticPredictor(args.model, device="cpu")
    items = val_items("nuclei_dsb2018")[: args.images]
    images = [np.asarray(Image.open(SHARED / "nuclei_dsb2018" / it["image"]).convert("RGB")) for it in items]
    predictor.predict_logits(images[0])  # warm-up
    seconds = {"was": 0.0, "is": 0.0}
    diff = 0.0
    for img in images:
        with pooling_as_it_was():
            t = time.perf_counter()
            old = predictor.predict_logits(img)
            seconds["was"] += time.perf_counter() - t
        t = time.perf_counter()
        new = predictor.predict_logits(img)
        seconds["is"] += time.perf_counter() - t
        diff = max(diff, float(np.abs(old - new).max()))
    pixels = sum(i.shape[0] * i.shape[1] for i in images)
    print_and_save({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(), "threads": args.threads,
        "torch": torch.__version__, "model": args.model, "images": len(images), "megapixels": round(pixels / 1e6, 2),
        "s_per_image_pooling_as_it_was (baseline)": round(seconds["was"] / len(images), 3),
        "s_per_image_pooling_as_it_is": round(seconds["is"] / len(images), 3),
        "speedup": round(seconds["was"] / seconds["is"], 2), "max_abs_logit_difference": diff,
    }, args.json)


if __name__ == "__main__":
    main()
