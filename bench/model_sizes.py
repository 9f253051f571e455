"""Parameters and MACs of LGViT, LGViT + neck and HRMedSeg, beside the paper's figures.

    .venv/bin/python bench/model_sizes.py [--size 1024] [--threads 1]

Random weights, one (1, 3, size, size) image, one class. MACs come from
``torch.utils.flop_counter.FlopCounterMode``, which counts only matrix products and convolutions
(aten mm/addmm/bmm/baddbmm, convolution incl. transposed, SDPA) as 2 FLOPs per multiply-add;
we halve its total. Pooling, norms, softmax, activations, element-wise ops and interpolation
are not counted (they are < 1 % here).

A second MAC column charges every transposed convolution ``output pixels x in_channels x k^2``,
as thop 0.1.1 does (``calculate_conv2d_flops``); for a 2x2 stride-2 one that is 4x its real
work. The paper's HRMedSeg figure matches this convention, not the real count (see
src/hrmedseg/models/ecm_decoder.py). If ``thop`` is importable, its own totals are printed too.
Runs in a few seconds on one CPU core.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hrmedseg.models.hrmedseg_model import HRMedSeg
from hrmedseg.models.neck import HRMedSegEncoder

# (params in M, GMACs at 1024^2, source)
PAPER = {
    "LGViT alone": (0.96, 3.91, "ARCHITECTURE.md, measured with the authors' code"),
    "LGViT + neck": (1.57, 6.43, "paper (HRMedSegSAM backbone)"),
    "HRMedSeg (1 class)": (3.53, 9.39, "paper"),
}


def transposed_conv_overcount(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Run ``model`` once; MACs that the thop rule adds over the real count of transposed convs."""
    extra: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ConvTranspose2d):

            def hook(m, inputs, output, name=name):
                k = math.prod(m.kernel_size)
                real = inputs[0].numel() * (m.out_channels // m.groups) * k
                thop_rule = output.numel() * (m.in_channels // m.groups) * k
                extra[name] = thop_rule - real

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return sum(extra.values()), extra


def count_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Real multiply-accumulates of one forward pass, total and per aten op."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    per_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() // 2, per_op


def thop_macs(model: nn.Module, x: torch.Tensor) -> float | None:
    try:
        from thop import profile  # optional cross-check, not a dependency
    except ImportError:
        return None
    import copy

    macs, _ = profile(copy.deepcopy(model), inputs=(x,), verbose=False)
    return float(macs)


def rel(measured: float, reference: float) -> str:
    return f"{100 * (measured - reference) / reference:+.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="square input side (multiple of 16)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = HRMedSeg(num_classes=1).eval()
    encoder: HRMedSegEncoder = model.encoder
    parts = {"LGViT alone": encoder.image_encoder, "LGViT + neck": encoder, "HRMedSeg (1 class)": model}
    x = torch.randn(1, 3, args.size, args.size)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, input 1 x 3 x {args.size}^2")
    header = (
        "| part | params | paper | diff | GMACs (FlopCounterMode) | paper | diff "
        "| GMACs (thop rule for ConvTranspose) | diff |"
    )
    print(header)
    print("| --- " * 9 + "|")
    details = {}
    for label, module in parts.items():
        params = sum(p.numel() for p in module.parameters())
        macs, per_op = count_macs(module, x)
        extra, per_conv = transposed_conv_overcount(module, x)
        paper_params, paper_gmacs, _ = PAPER[label]
        scale = (args.size / 1024) ** 2  # every part is linear in the number of pixels
        print(
            f"| {label} | {params / 1e6:.4f} M | {paper_params:.2f} M | {rel(params / 1e6, paper_params)} "
            f"| {macs / 1e9:.4f} | {paper_gmacs * scale:.2f} | {rel(macs / 1e9, paper_gmacs * scale)} "
            f"| {(macs + extra) / 1e9:.4f} | {rel((macs + extra) / 1e9, paper_gmacs * scale)} |"
        )
        details[label] = (params, macs, per_op, per_conv, module)

    print("\nSources of the reference figures:")
    for label, (_, _, source) in PAPER.items():
        print(f"  {label}: {source}")
    print("\nGMACs per aten op (FlopCounterMode / 2):")
    for label, (_, _, per_op, _, _) in details.items():
        print(f"  {label}: " + ", ".join(f"{op} {v / 1e9:.4f}" for op, v in per_op.items()))
    _, _, _, per_conv, _ = details["HRMedSeg (1 class)"]
    print("Transposed convs, thop rule minus real MACs (G): "
          + ", ".join(f"{n} {v / 1e9:.4f}" for n, v in per_conv.items()))
    decoder_macs = details["HRMedSeg (1 class)"][1] - details["LGViT + neck"][1]
    print(f"ECM-Decoder alone: {details['HRMedSeg (1 class)'][0] - details['LGViT + neck'][0]:,} params, "
          f"{decoder_macs / 1e9:.4f} GMACs real, {(decoder_macs + sum(per_conv.values())) / 1e9:.4f} GMACs thop rule "
          f"(paper: 3.53 - 1.57 = 1.96 M, 9.39 - 6.43 = 2.96 G)")

    thop_totals = {label: thop_macs(d[4], x) for label, d in details.items()}
    if all(v is not None for v in thop_totals.values()):
        print("thop.profile totals (GMACs): " + ", ".join(f"{k} {v / 1e9:.4f}" for k, v in thop_totals.items()))
    else:
        print("thop not installed: no thop.profile cross-check")
    print(f"\nwall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
