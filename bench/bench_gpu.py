"""GPU speed of the encoder and the box-to-mask path, with the fp32 reference in the same run.

On the GPU machine (one H100; torch >= 2.1, this package installed with --no-deps):

    python bench/bench_gpu.py                      # all sections, ~5 min including torch.compile
    python bench/bench_gpu.py --sections decoder,engine,encoder   # no profile, no compile

Without CUDA it runs a smoke test at a tiny size on the CPU (``--smoke`` forces that).

Sections, in this order (the slow compilation last, so a time box never hides the rest), each
figure the median wall-clock over ``--repeats`` runs after warm-up, CUDA-synchronised:
- decoder: box -> low-res mask on one cached 1024 x 1024 crop (boxes/s): segment-anything's
  MaskDecoder (reference, fp32), FastMaskDecoder fp32 and bf16, full grid and box regions;
  prompt encoding included;
- engine: the whole box -> native mask path of ``BoxPredictor`` (crop planning, prompt
  encoding, decoding, native-resolution masks copied to the host) for nucleus-sized boxes on
  one cached crop, per ``decode_batch``;
- encoder: batch 1 latency and batch-64 images/s of the reference fp32, fast fp32, fast bf16
  (autocast), fast all-bf16 (``.to(torch.bfloat16)``), and all-bf16 under a CUDA graph, each
  with its relative L2 error to the reference;
- profile: the CUDA kernels of the all-bf16 encoder at batch 64 (torch.profiler), top 15;
- compile: the all-bf16 encoder through torch.compile (inductor, default mode, whole graph),
  alone and under a CUDA graph.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hrmedseg.models import EncoderConfig, build_encoder  # noqa: E402
from hrmedseg.models.cuda_graph import CudaGraphRunner  # noqa: E402
from hrmedseg.models.fast_encoder import FastHRMedSegEncoder  # noqa: E402
from hrmedseg.models.runtime import build_fast_encoder, measure  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lgvit_neck_golden.pt"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def encoder_models(args, device):
    """(reference fp32, {name: fast variant}) on ``device``, golden weights where available."""
    small = EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6))
    reference = build_encoder(small if args.smoke else None)
    if GOLDEN.exists() and not args.smoke:
        reference.load_state_dict(torch.load(GOLDEN, map_location="cpu", weights_only=True)["state_dict"])
    reference = reference.eval().to(device)
    fast = {
        "fast fp32": FastHRMedSegEncoder.from_reference(reference),
        "fast bf16 (autocast)": FastHRMedSegEncoder.from_reference(reference, bf16=True),
        "fast all-bf16": FastHRMedSegEncoder.from_reference(reference).to(torch.bfloat16),
    }
    return reference, fast


def encoder_row(name, f1, fb, args, inputs, expected, sync) -> None:
    """One table row: batch-1 latency, batch-N images/s and error of ``f1``/``fb`` (1 / N images)."""
    x1, xb = inputs
    try:
        err = rel_l2(f1(x1), expected)
        t1 = measure(lambda: f1(x1), args.repeats, warmup=2, sync=sync)
        tb = measure(lambda: fb(xb), max(3, args.repeats // 4), warmup=1, sync=sync)
        print(f"| {name} | {t1.median * 1e3:.2f} | {t1.minimum * 1e3:.2f} | {args.batch / tb.median:.0f} | {err:.1e} |", flush=True)
    except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
        print(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | |", flush=True)


def encoder_table(args, title: str, device, reference) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Print a table header; return the (batch-1, batch-N) inputs and the reference's batch-1 output."""
    print(f"\n## {title}, input {args.size} x {args.size}")
    print("| variant | batch 1 latency ms (median) | min | batch %d images/s | rel. L2 error |" % args.batch)
    print("| --- | --- | --- | --- | --- |")
    inputs = (torch.randn(1, 3, args.size, args.size, device=device), torch.randn(args.batch, 3, args.size, args.size, device=device))
    return inputs, reference(inputs[0])


def bench_encoder(args, device, sync, models) -> None:
    reference, fast = models
    with torch.inference_mode():
        inputs, expected = encoder_table(args, "Encoder", device, reference)
        encoder_row("reference fp32", reference, reference, args, inputs, expected, sync)
        for name, model in fast.items():
            encoder_row(name, model, model, args, inputs, expected, sync)
        if device.type == "cuda":
            graphs = CudaGraphRunner(fast["fast all-bf16"])
            encoder_row("fast all-bf16 + CUDA graph", graphs, graphs, args, inputs, expected, sync)
        for backend in ("fast", "fast-bf16"):  # what the engine runs (CUDA graphs on GPUs)
            runner = build_fast_encoder(reference, backend)
            encoder_row(f"runtime build_fast_encoder({backend!r})", runner, runner, args, inputs, expected, sync)


def bench_profile(args, device, models) -> None:
    """Where the all-bf16 encoder's time goes at batch ``args.batch``: the top CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile

    model = models[1]["fast all-bf16"]
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with torch.inference_mode():
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        model(x)
        with profile(activities=[activity]) as prof:
            for _ in range(2):
                model(x)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\n## Profile: fast all-bf16, batch {args.batch} (2 calls)\n```")
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
    print("```", flush=True)


def bench_compile(args, device, sync, models) -> None:
    """torch.compile (inductor, default mode, fullgraph) of the all-bf16 encoder, per input shape."""
    reference, fast = models
    with torch.inference_mode():
        inputs, expected = encoder_table(args, "Encoder through torch.compile", device, reference)
        model = fast["fast all-bf16"]
        model(inputs[0])  # fill the RoPE / bias-map caches outside the traced graph
        start = time.perf_counter()
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        compiled(inputs[0]), compiled(inputs[1])
        sync() if sync else None
        print(f"(compiling both shapes took {time.perf_counter() - start:.0f} s)", flush=True)
        encoder_row("all-bf16 + torch.compile", compiled, compiled, args, inputs, expected, sync)
        if device.type == "cuda":
            graphs = CudaGraphRunner(compiled)
            encoder_row("all-bf16 + torch.compile + CUDA graph", graphs, graphs, args, inputs, expected, sync)
        runner = build_fast_encoder(reference, "fast-bf16", compile=True)  # the API's option
        encoder_row("runtime build_fast_encoder('fast-bf16', compile=True)", runner, runner, args, inputs, expected, sync)


def bench_engine_one_crop(args, device, sync) -> None:
    """Whole box -> native mask path of BoxPredictor, many nucleus boxes on one cached crop."""
    from bench_engine import build_ours, nucleus_boxes, test_image

    from hrmedseg.engine import BoxPredictor

    size = 128 if args.smoke else 512  # at scale 2 a 512 x 512 image is exactly one crop
    boxes = nucleus_boxes(args.boxes, size)
    image = test_image(size, boxes)
    model = build_ours(args.smoke)
    print(f"\n## Box -> native mask, BoxPredictor, {len(boxes)} boxes of 10..40 px on one cached crop ({size} x {size} uint16)")
    print("| backend | decode_batch | boxes/s (median) | best | encoder calls |")
    print("| --- | --- | --- | --- | --- |")
    configs = [("auto", None)] + [(backend, batch) for backend in ("fast", "fast-bf16") for batch in (8, 64, 256)]
    for backend, batch in configs:
        predictor = BoxPredictor(model, device=device, backend=backend, decode_batch=batch)
        list(predictor.predict_boxes(image, boxes))  # encodes the crop once, fills the cache
        t = measure(lambda: list(predictor.predict_boxes(image, boxes)), max(3, args.repeats // 4), warmup=1, sync=sync)
        name = f"{backend} (default: {predictor.backend})" if backend == "auto" else backend
        batch_text = f"default ({predictor.decode_batch})" if batch is None else batch
        print(f"| {name} | {batch_text} | {len(boxes) / t.median:.0f} | {len(boxes) / t.minimum:.0f} | {predictor.encoder_calls} |", flush=True)


def bench_decoder(args, device, sync) -> None:
    try:
        from bench_decoder import random_boxes

        from hrmedseg.models.fast_decoder import FastMaskDecoder, regions_from_boxes
        from hrmedseg.models.sam import build_sam_prompt_decoder
    except ImportError as err:
        print(f"\nbox -> mask skipped: {err}")
        return
    prompt_encoder, mask_decoder = build_sam_prompt_decoder()
    prompt_encoder, mask_decoder = prompt_encoder.eval().to(device), mask_decoder.eval().to(device)
    fast = FastMaskDecoder.from_sam(mask_decoder, prompt_encoder)
    g = torch.Generator().manual_seed(0)
    n = args.boxes
    boxes = random_boxes(n, g).to(device)
    regions = regions_from_boxes(boxes.cpu())
    embedding = torch.randn(1, 256, 64, 64, device=device)
    image_pe = prompt_encoder.get_dense_pe()
    print(f"\n## Box -> mask on one cached 1024 x 1024 crop ({n} boxes of 16..256 px, single mask)")
    print("| path | boxes/s (median) | best | max abs diff to SAM (first 16 boxes) |")
    print("| --- | --- | --- | --- |")

    def autocast(bf16: bool):
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    with torch.inference_mode():
        sparse16, dense16 = prompt_encoder(points=None, boxes=boxes[:16], masks=None)
        ref16, _ = mask_decoder(embedding, image_pe, sparse16, dense16, False)

        def reference():
            for i in range(0, n, args.chunk):
                sparse, dense = prompt_encoder(points=None, boxes=boxes[i : i + args.chunk], masks=None)
                mask_decoder(embedding, image_pe, sparse, dense, False)

        t = measure(reference, max(2, args.repeats // 4), warmup=1, sync=sync)
        print(f"| SAM MaskDecoder fp32 (reference), chunks of {args.chunk} | {n / t.median:.0f} | {n / t.minimum:.0f} | |", flush=True)
        fast.prepare(embedding, image_pe)
        for bf16 in (False, True):
            for use_regions in (False, True):
                name = f"FastMaskDecoder {'bf16' if bf16 else 'fp32'}, {'box regions' if use_regions else 'full grid'}"

                def run(bf16=bf16, use_regions=use_regions):
                    with autocast(bf16):
                        sparse, _ = prompt_encoder(points=None, boxes=boxes, masks=None)
                        return fast.predict(sparse, None, regions if use_regions else None, chunk_size=args.chunk)

                try:
                    out = run()
                    if use_regions:
                        err = max((m.float() - ref16[k, :, y0:y1, x0:x1]).abs().max().item()
                                  for k, (m, (x0, y0, x1, y1)) in enumerate(zip(out.masks[:16], regions[:16].tolist())))
                    else:
                        err = (out.masks[:16].float() - ref16).abs().max().item()
                    t = measure(run, args.repeats, warmup=1, sync=sync)
                    print(f"| {name} | {n / t.median:.0f} | {n / t.minimum:.0f} | {err:.1e} |", flush=True)
                except Exception as err:  # noqa: BLE001
                    print(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | |", flush=True)


def bench_agreement(args, device) -> None:
    """Masks of the shipped box model on the bundled samples: default backend vs exact float32."""
    from bench_engine import mask_dice
    from hrmedseg.data import load_sample, sample_boxes, sample_names
    from hrmedseg.defaults import DEFAULT_BOX_MODEL
    from hrmedseg.engine import BoxPredictor
    from hrmedseg.io.boxes import read_boxes

    default = BoxPredictor(DEFAULT_BOX_MODEL, device=device)
    exact = BoxPredictor(DEFAULT_BOX_MODEL, device=device, backend="fast")
    print(f"\n## Masks of {DEFAULT_BOX_MODEL} on the bundled samples: backend {default.backend} vs fast (float32)")
    print("| sample | boxes | mean Dice between the two | min Dice |")
    print("| --- | --- | --- | --- |")
    for name in sample_names():
        boxes_file = sample_boxes(name)
        if boxes_file is None:
            continue
        image, boxes = load_sample(name), read_boxes(boxes_file)
        dice = [mask_dice(a.mask, b.mask) for a, b in zip(default.predict_boxes(image, boxes), exact.predict_boxes(image, boxes))]
        print(f"| {name} | {len(boxes)} | {np.mean(dice):.4f} | {np.min(dice):.4f} |", flush=True)


SECTIONS = ("decoder", "engine", "agreement", "encoder", "profile", "compile")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (automatic without CUDA)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(sections - set(SECTIONS)))}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.smoke = args.smoke or device.type != "cuda"
    if args.smoke:
        args.size, args.batch, args.boxes, args.chunk, args.repeats = 64, 4, 8, 4, 2
        sections.discard("compile")
        torch.set_num_threads(2)
    else:
        args.size, args.batch, args.boxes, args.chunk = 1024, 64, 1024, 256
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32
        torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU smoke test (tiny sizes, not a benchmark)"
    print(f"# bench_gpu: {name}, torch {torch.__version__}")
    if "decoder" in sections:
        bench_decoder(args, device, sync)
    if "engine" in sections:
        bench_engine_one_crop(args, device, sync)
    if "agreement" in sections:
        bench_agreement(args, device)
    models = encoder_models(args, device) if sections & {"encoder", "profile", "compile"} else None
    if "encoder" in sections:
        bench_encoder(args, device, sync, models)
    if "profile" in sections:
        bench_profile(args, device, models)
    if "compile" in sections:
        bench_compile(args, device, sync, models)


if __name__ == "__main__":
    main()
