"""Benchmark of the box engine (hrmedseg.engine.BoxPredictor) against SAM ViT-B's SamPredictor.

Measures, with random weights (speed and geometry only, no segmentation quality):
1. first box on a new region, end to end (read, intensity, encode, decode, native mask);
2. each further box on a cached region (one predict_box call per box);
3. N nucleus-sized boxes (10-40 px) on an S x S uint16 image, whole segment() call;
4. baseline: SAM ViT-B through SamPredictor on the whole image resized to 1024, same boxes;
5. boundary error on small discs, from an oracle logit field (signed distance) sampled on
   each pipeline's low-res logit grid and mapped back with that pipeline's own post-processing
   (SamPredictor: bilinear to 1024, crop, bilinear to the image size; ours: logits_to_native
   on the box's crop). This isolates the resampling error each pipeline's geometry imposes;
6. with --backends: the whole segment() call under each named engine backend, round-robin over
   --repeats rounds, and each backend's labels against the first one's (per-object Dice).

    .venv/bin/python bench/bench_engine.py                       # full settings, CPU
    .venv/bin/python bench/bench_engine.py --small               # quick check
    python bench/bench_engine.py --device cuda --threads 16      # GPU: adds boxes per second
    .venv/bin/python bench/bench_engine.py --no-baseline --backends fast,fast-bf16 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import time
from unittest import mock
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from report import cpu_summary, print_and_save


def nucleus_boxes(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wh = rng.uniform(10, 40, (n, 2))
    xy = rng.uniform(0, size - 40, (n, 2))
    return np.c_[xy, xy + wh]


def test_image(size: int, boxes: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint16 fluorescence-like image: dim noisy background, bright elliptical nuclei in the boxes."""
    rng = np.random.default_rng(seed)
    img = rng.normal(300, 40, (size, size)).clip(0, None)
    for x0, y0, x1, y1 in boxes:
        ys, xs = slice(int(y0), int(np.ceil(y1))), slice(int(x0), int(np.ceil(x1)))
        yy, xx = np.mgrid[ys, xs] + 0.5
        inside = ((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 < 1
        img[ys, xs][inside] += 3000
    return img.astype(np.uint16)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def build_ours(small: bool):
    from hrmedseg.models.neck import EncoderConfig, HRMedSegEncoder
    from hrmedseg.models.sam import build_hrmedseg_sam

    torch.manual_seed(0)
    enc = HRMedSegEncoder(EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))) if small else None
    return build_hrmedseg_sam(enc)


def disc_boundary_error(radius: float, size: int, predictor_policy) -> dict:
    """Oracle signed-distance logits on each pipeline's grid -> native mask vs the true disc."""
    from hrmedseg.engine.crops import logits_to_native, plan_crops

    cy = cx = size / 2 + 0.37
    box = np.array([cx - radius, cy - radius, cx + radius, cy + radius])
    lo, hi = int(cy - radius - 4), int(np.ceil(cy + radius + 4))
    yy, xx = np.mgrid[lo:hi, lo:hi] + 0.5
    truth = np.hypot(yy - cy, xx - cx) < radius

    def score(mask):
        inter = (mask & truth).sum()
        dice = 2 * inter / (mask.sum() + truth.sum())
        # mean distance of wrongly labelled pixels' centres from the true circle, per boundary px
        wrong = mask != truth
        err_area = wrong.sum()
        return {"dice": round(float(dice), 4), "wrong_px": int(err_area), "wrong_px_per_boundary_px": round(float(err_area / (2 * np.pi * radius)), 3)}

    # baseline: image resized so the long side is 1024; low-res 256 x 256; SAM's postprocess
    s_base = 1024 / size
    g = (torch.arange(256, dtype=torch.float64) * 4 + 2) / s_base  # cell centres, native px
    field = (radius - torch.sqrt((g[:, None] - cy) ** 2 + (g[None, :] - cx) ** 2))[None, None].float() * s_base
    up = F.interpolate(field, (1024, 1024), mode="bilinear", align_corners=False)
    up = F.interpolate(up[..., : round(size * s_base), : round(size * s_base)], (size, size), mode="bilinear", align_corners=False)
    base = (up[0, 0, lo:hi, lo:hi] > 0).numpy()
    # ours: the crop the engine plans for this box
    crop = plan_crops(box[None], (size, size), predictor_policy)[0]
    gy = crop.y0 + (torch.arange(256, dtype=torch.float64) * 4 + 2) / crop.scale
    gx = crop.x0 + (torch.arange(256, dtype=torch.float64) * 4 + 2) / crop.scale
    f2 = (radius - torch.sqrt((gy[:, None] - cy) ** 2 + (gx[None, :] - cx) ** 2)).float() * crop.scale
    ours = logits_to_native(f2, crop, (lo, hi, lo, hi))
    return {"radius_px": radius, "baseline": score(base), "ours": score(ours), "ours_scale": crop.scale}


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def object_dice(labels: np.ndarray, reference: np.ndarray, n: int) -> list[float]:
    """Per-object Dice of labels 1..n against the same labels in ``reference``."""
    return [mask_dice(labels == i, reference == i) for i in range(1, n + 1)]


def compare_backends(model, image, boxes, device, policy, backends: list[str], repeats: int) -> dict:
    """segment() under each backend, interleaved round by round (noisy machines); Dice to the first."""
    from hrmedseg.engine import BoxPredictor

    predictors = {name: BoxPredictor(model, device=device, policy=policy, backend=name) for name in backends}
    times: dict[str, list[float]] = {name: [] for name in backends}
    labels: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, predictor in predictors.items():
            predictor.clear_cache()
            (labels[name], _), t = timed(lambda p=predictor: p.segment(image, boxes), device)
            times[name].append(t)
    out = {}
    for name in backends:
        dice = object_dice(labels[name], labels[backends[0]], len(boxes))
        out[name] = {
            "segment_s_median": round(float(np.median(times[name])), 3),
            "segment_s_min": round(float(np.min(times[name])), 3),
            "boxes_per_s": round(len(boxes) / float(np.median(times[name])), 1),
            "encoder_calls": predictors[name].encoder_calls // repeats,
            f"dice_to_{backends[0]}_mean": round(float(np.mean(dice)), 4),
            f"dice_to_{backends[0]}_min": round(float(np.min(dice)), 4),
        }
    return out


@contextlib.contextmanager
def step_timer(predictor, device):
    """Time the steps of predictor's calls: yields {step: seconds}, summed over calls.

    The real functions run, wrapped (module attributes of hrmedseg.engine.predictor and the
    encoder's and decoder's classes' ``__call__``), so the breakdown is of the real call path.
    """
    import hrmedseg.engine.predictor as engine

    seconds: dict[str, float] = {}

    def timing(step, fn):
        def run(*args, **kwargs):
            out, t = timed(lambda: fn(*args, **kwargs), device)
            seconds[step] = seconds.get(step, 0.0) + t
            return out
        return run

    steps = {
        "intensity_stats": (engine, "compute_scaling"),
        "read_and_resize_crop": (engine, "read_crop"),
        "box_prior": (engine, "add_box_prior"),
        "prior_rule": (engine, "apply_prior_rule"),
        "mask_to_native": (engine, "logits_to_native_batch"),
        "encoder": (type(predictor.encoder), "__call__"),
        "decoder": (type(predictor.decoder), "__call__"),
    }
    with contextlib.ExitStack() as stack:
        for step, (owner, name) in steps.items():
            stack.enter_context(mock.patch.object(owner, name, timing(step, getattr(owner, name))))
        yield seconds


def first_box_breakdown(predictor, image, box, device) -> dict:
    """One first box on a new region (fresh caches), end to end and per step; "other" is the rest."""
    predictor.clear_cache()
    with step_timer(predictor, device) as seconds:
        _, total = timed(lambda: predictor.predict_box(image, box), device)
    out = {"total_s": round(total, 4)} | {f"{k}_s": round(v, 4) for k, v in seconds.items()}
    out["other_s"] = round(total - sum(seconds.values()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--boxes", type=int, default=200)
    ap.add_argument("--cached-boxes", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="tiny encoder, 512 image, 20 boxes: checks the script runs")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--max-upscale", type=float, default=2.0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--backends", help="comma-separated engine backends to compare on the whole segment() call, e.g. fast,fast-bf16")
    ap.add_argument("--repeats", type=int, default=3, help="rounds for --backends")
    args = ap.parse_args()
    if args.small:
        args.size, args.boxes, args.cached_boxes = 512, 20, 3
    torch.set_num_threads(args.threads)
    from hrmedseg.engine import BoxPredictor, CropPolicy

    device = torch.device(args.device)
    policy = CropPolicy(max_upscale=args.max_upscale)
    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpu": cpu_summary(),
        "settings": vars(args),
    }
    boxes = nucleus_boxes(args.boxes, args.size)
    image = test_image(args.size, boxes)
    model = build_ours(args.small)
    predictor = BoxPredictor(model, device=device, policy=policy)
    results["backend"] = predictor.backend
    # warm-up on another image (first-call allocations), then a fresh cache
    predictor.predict_box(np.zeros((300, 300), np.uint16), [10, 10, 40, 40])
    predictor.clear_cache()
    with torch.inference_mode():
        emb_in = torch.zeros(1, 3, 1024, 1024, device=device)
        _, t_enc = timed(lambda: predictor.encoder(emb_in), device)
    results["encoder_alone_s"] = round(t_enc, 4)

    first_box = boxes[0]
    _, t_first = timed(lambda: predictor.predict_box(image, first_box), device)
    results["first_box_new_region_s"] = round(t_first, 4)
    # Where the first box's time goes (a new region again: fresh caches, the same box)
    results["first_box_breakdown"] = first_box_breakdown(predictor, image, first_box, device)
    crop = predictor.predict_box(image, first_box).crop
    same = [b for b in boxes[1:] if crop.y0 <= b[1] - 16 and b[3] + 16 <= crop.y0 + crop.size and crop.x0 <= b[0] - 16 and b[2] + 16 <= crop.x0 + crop.size]
    rng = np.random.default_rng(1)
    while len(same) < args.cached_boxes:  # boxes inside the same crop
        c = rng.uniform(crop.x0 + 40, crop.x0 + crop.size - 80, 2)
        same.append(np.r_[c, c + 25])
    calls = predictor.encoder_calls
    times = []
    for b in same[: args.cached_boxes]:
        _, t = timed(lambda b=b: predictor.predict_box(image, b), device)
        times.append(t)
    assert predictor.encoder_calls == calls, "cached boxes must not re-encode"
    results["cached_box_s"] = {"median": round(float(np.median(times)), 4), "max": round(float(np.max(times)), 4), "n": len(times)}

    fresh = BoxPredictor(model, device=device, policy=policy)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (labels, records), t_all = timed(lambda: fresh.segment(image, boxes), device)
    results["segment_all"] = {
        "boxes": len(boxes),
        "total_s": round(t_all, 3),
        # pages touched afresh during the call (hrmedseg.models.malloc_tuning: HRMEDSEG_MALLOC_TUNING)
        "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
        "boxes_per_s": round(len(boxes) / t_all, 2),
        "encoder_calls": fresh.encoder_calls,
        "decoder_calls": fresh.decoder_calls,
        "empty": sum(r.empty for r in records),
        # whether its encoder ran an ahead-of-time compiled package (hrmedseg.models.aot_cache)
        "compiled_encoder": getattr(fresh.encoder.image_encoder, "compiled", None) is not None,
    }

    if not args.no_baseline:
        from segment_anything import SamPredictor, sam_model_registry

        torch.manual_seed(0)
        vitb = sam_model_registry["vit_b"](checkpoint=None).to(device).eval()
        sp = SamPredictor(vitb)
        scaling = fresh.scaling(__import__("hrmedseg.io", fromlist=["open_image"]).open_image(image))
        rgb8 = scaling.apply(image[..., None]).astype(np.uint8)

        def baseline():
            sp.set_image(rgb8)
            kept = 0
            for i in range(0, len(boxes), 16):
                b = sp.transform.apply_boxes_torch(torch.as_tensor(boxes[i : i + 16], device=device, dtype=torch.float32), rgb8.shape[:2])
                masks, scores, _ = sp.predict_torch(None, None, boxes=b, multimask_output=False)
                kept += int(masks.shape[0])  # full-image masks: (16, 1, H, W) per batch
            return kept

        _, t_set = timed(lambda: sp.set_image(rgb8), device)
        _, t_base = timed(baseline, device)
        results["baseline_sam_vit_b"] = {
            "set_image_s": round(t_set, 3),
            "total_s": round(t_base, 3),
            "boxes_per_s": round(len(boxes) / t_base, 2),
            "note": "whole image resized to 1024; one embedding; full-size masks per box",
        }
    if args.backends:
        results["backends"] = compare_backends(model, image, boxes, device, policy, args.backends.split(","), args.repeats)
    results["boundary_error_small_discs"] = [disc_boundary_error(r, args.size, policy) for r in (5.0, 10.0, 20.0)]
    print_and_save(results, args.json)


if __name__ == "__main__":
    main()
