"""SAM mask decoder speed on box prompts: segment-anything's MaskDecoder vs FastMaskDecoder.

    .venv/bin/python bench/bench_decoder.py [--threads 2] [--repeats 5] [--ref-batches 1,16]

Random weights (speed does not depend on them), one 64 x 64 x 256 embedding (a 1024 x 1024
crop), boxes of random size 16..256 px in the 1024 input (nuclei to organ-sized objects),
single-mask output; the fast decoder in float32 and in bf16 (with float32 heads, as the CPU's
"fast-bf16" backend runs it). Per-box figures are median wall-clock time divided by the batch size;
the reference is measured in the same run. Masks are compared on every run (max abs error).
"""

from __future__ import annotations

import argparse

import torch

from hrmedseg.models.fast_decoder import FastMaskDecoder, regions_from_boxes
from hrmedseg.models.runtime import measure
from hrmedseg.models.sam import build_sam_prompt_decoder


def random_boxes(n: int, generator: torch.Generator, size: int = 1024, lo: int = 16, hi: int = 256) -> torch.Tensor:
    wh = torch.randint(lo, hi + 1, (n, 2), generator=generator).float()
    xy = torch.rand(n, 2, generator=generator) * (size - wh)
    return torch.cat([xy, xy + wh], dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ref-batches", default="1,16", help="batch sizes for the (slow) reference")
    parser.add_argument("--batches", default="1,16,128", help="batch sizes for the fast decoder")
    parser.add_argument("--margin", type=int, default=4, help="low-res pixels around each box")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    prompt_encoder, mask_decoder = build_sam_prompt_decoder()
    prompt_encoder.eval()
    mask_decoder.eval()
    embedding = torch.randn(1, 256, 64, 64, generator=g)
    image_pe = prompt_encoder.get_dense_pe()
    fast = FastMaskDecoder.from_sam(mask_decoder, prompt_encoder)
    bf16 = torch.bfloat16
    fast16 = FastMaskDecoder.from_sam(mask_decoder, prompt_encoder, bf16)  # a bf16 copy, float32 heads
    print(f"threads {args.threads}, torch {torch.__version__}, repeats {args.repeats}")
    print("| path | boxes | ms per box (median) | min | max abs diff to SAM |")
    print("| --- | --- | --- | --- | --- |")

    def row(name, n, timing, err="") -> None:
        print(f"| {name} | {n} | {timing.median / n * 1e3:.1f} | {timing.minimum / n * 1e3:.1f} | {err} |", flush=True)

    with torch.inference_mode():
        for n in [int(s) for s in args.ref_batches.split(",") if s]:
            boxes = random_boxes(n, g)
            sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
            timing = measure(lambda: mask_decoder(embedding, image_pe, sparse, dense, False), args.repeats)
            row("SAM MaskDecoder (reference)", n, timing)
        t_prep = measure(lambda: fast.prepare(embedding, image_pe), args.repeats)
        print(f"| FastMaskDecoder.prepare (once per crop) | - | {t_prep.median * 1e3:.1f} (per crop) | {t_prep.minimum * 1e3:.1f} | |")
        for n in [int(s) for s in args.batches.split(",") if s]:
            boxes = random_boxes(n, g)
            sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
            regions = regions_from_boxes(boxes, margin=args.margin)
            ref_masks = None
            if n <= 16:
                ref_masks, _ = mask_decoder(embedding, image_pe, sparse, dense, False)
            fast.prepare(embedding, image_pe)
            out = fast.predict(sparse, dense, regions)
            err = ""
            if ref_masks is not None:
                err = max(
                    (m - ref_masks[k, :, y0:y1, x0:x1]).abs().max().item()
                    for k, (m, (x0, y0, x1, y1)) in enumerate(zip(out.masks, regions.tolist()))
                )
                err = f"{err:.1e}"
            timing = measure(lambda: fast.predict(sparse, dense, regions), args.repeats)
            row("Fast, box regions", n, timing, err)
            fast16.prepare(embedding.to(bf16), image_pe.to(bf16))
            sparse16 = sparse.to(bf16)
            out16 = fast16.predict(sparse16, None, regions)
            err16 = max((m16 - m).abs().max().item() for m16, m in zip(out16.masks, out.masks))
            timing = measure(lambda: fast16.predict(sparse16, None, regions), args.repeats)
            row("Fast bf16 (the CPU's fast-bf16 backend), box regions", n, timing, f"{err16:.1e} (to float32 Fast)")
            if n == 1:
                def with_prepare():
                    fast.prepare(embedding, image_pe)
                    return fast.predict(sparse, dense, regions)

                row("Fast, box region, prepare included (new crop)", n, measure(with_prepare, args.repeats), err)

                def with_prepare16():  # bf16 always shares block 0's projections, so pays them here
                    fast16.prepare(embedding.to(bf16), image_pe.to(bf16))
                    return fast16.predict(sparse16, None, regions)

                row("Fast bf16, box region, prepare included (new crop)", n, measure(with_prepare16, args.repeats), "")
            if n <= 16:
                full = fast.predict(sparse, dense, None)
                err_full = f"{(full.masks - ref_masks).abs().max().item():.1e}" if ref_masks is not None else ""
                row("Fast, full 256 x 256 grid", n, measure(lambda: fast.predict(sparse, dense, None), args.repeats), err_full)


if __name__ == "__main__":
    main()
