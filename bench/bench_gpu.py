"""GPU speed of the encoder and the box-to-mask path, with the fp32 reference in the same run.

On the GPU machine (one H100; torch >= 2.1, this package installed with --no-deps):

    python bench/bench_gpu.py                # all figures, ~5-10 min including torch.compile
    python bench/bench_gpu.py --no-compile   # skip torch.compile

Without CUDA it runs a smoke test at a tiny size on the CPU (``--smoke`` forces that).

Figures printed (median wall-clock over ``--repeats`` runs after warm-up, CUDA-synchronised):
1. encoder batch 1 latency (ms): reference fp32, fast fp32, fast bf16, fast bf16 + CUDA graph,
   fast bf16 + torch.compile (mode "max-autotune"), each with its relative L2 error;
2. encoder throughput at batch 64 (images/s) for the same variants (CUDA graph per batch size);
3. box -> mask on one cached crop (boxes/s): segment-anything's MaskDecoder (reference, fp32),
   FastMaskDecoder fp32 and bf16, full grid and box regions; prompt encoding included.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hrmedseg.models import EncoderConfig, build_encoder  # noqa: E402
from hrmedseg.models.fast_encoder import FastHRMedSegEncoder  # noqa: E402
from hrmedseg.models.runtime import measure  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lgvit_neck_golden.pt"


def cuda_graph(fn, example: torch.Tensor):
    """Capture ``fn(static_input)`` in a CUDA graph; returns a callable taking a same-shape tensor."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up fills caches (RoPE tables, bias maps) outside the graph
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def run(x: torch.Tensor) -> torch.Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out

    return run


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_encoder(args, device, sync) -> None:
    reference = build_encoder(None if not args.smoke else EncoderConfig(embed_dim=48, depths=(1, 1), num_heads=(3, 6)))
    if GOLDEN.exists() and not args.smoke:
        reference.load_state_dict(torch.load(GOLDEN, map_location="cpu", weights_only=True)["state_dict"])
    reference = reference.eval().to(device)
    fast = FastHRMedSegEncoder.from_reference(reference)
    fast_bf16 = FastHRMedSegEncoder.from_reference(reference, bf16=True)
    size = args.size
    variants = {
        "reference fp32": lambda x: reference(x),
        "fast fp32": fast,
        "fast bf16": fast_bf16,
    }
    print(f"\n## Encoder, input {size} x {size}")
    print("| variant | batch 1 latency ms (median) | min | batch %d images/s | rel. L2 error |" % args.batch)
    print("| --- | --- | --- | --- | --- |")
    compiled = None
    if args.compile:
        try:
            compiled = torch.compile(fast_bf16, mode="max-autotune", dynamic=False)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"torch.compile unavailable: {err}")
    with torch.inference_mode():
        x1 = torch.randn(1, 3, size, size, device=device)
        xb = torch.randn(args.batch, 3, size, size, device=device)
        expected = reference(x1)
        rows = dict(variants)
        if device.type == "cuda":
            rows["fast bf16 + CUDA graph"] = "graph"
        if compiled is not None:
            rows["fast bf16 + torch.compile(max-autotune)"] = compiled
        for name, fn in rows.items():
            try:
                if fn == "graph":
                    f1, fb = cuda_graph(fast_bf16, x1), cuda_graph(fast_bf16, xb)
                else:
                    f1 = fb = fn
                err = rel_l2(f1(x1), expected)
                t1 = measure(lambda: f1(x1), args.repeats, warmup=2, sync=sync)
                tb = measure(lambda: fb(xb), max(3, args.repeats // 4), warmup=1, sync=sync)
                print(f"| {name} | {t1.median * 1e3:.2f} | {t1.minimum * 1e3:.2f} | {args.batch / tb.median:.0f} | {err:.1e} |", flush=True)
            except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
                print(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | |", flush=True)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (automatic without CUDA)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.smoke = args.smoke or device.type != "cuda"
    if args.smoke:
        args.size, args.batch, args.boxes, args.chunk, args.repeats = 64, 4, 8, 4, 2
        args.compile = False
        torch.set_num_threads(2)
    else:
        args.size, args.batch, args.boxes, args.chunk = 1024, 64, 1024, 256
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32
        torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU smoke test (tiny sizes, not a benchmark)"
    print(f"# bench_gpu: {name}, torch {torch.__version__}")
    bench_encoder(args, device, sync)
    bench_decoder(args, device, sync)


if __name__ == "__main__":
    main()
