"""Where the fast encoder's time goes on the CPU: torch.profiler operator table, grouped by kind.

    PYTHONPATH=src:bench .venv/bin/python bench/profile_encoder.py [--threads 2] [--calls 5] [--fp32] [--aot]

Runs the fast LGViT + neck (bf16 by default; ``--fp32`` for float32) on the golden 1024^2 input
(random weights if the golden file is absent), ``--calls`` profiled calls after two warm-up
calls, and prints (1) self CPU time per operator and input shapes, (2) the same summed into
kinds: matrix products, convolutions, LayerNorm, element-wise, layout copies, casts, other.
The totals are not wall times (the profiler adds its own cost per operator): compare kinds.
``--aot`` profiles the AOTInductor-compiled module instead (its generated kernels appear as
one ``aoti`` region plus the extern oneDNN calls it makes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_encoder import GOLDEN
from hrmedseg.models import build_encoder
from hrmedseg.models.fast_encoder import FastHRMedSegEncoder

KINDS = {
    "matrix products": ("addmm", "mm", "bmm", "matmul", "linear", "_linear_pointwise", "baddbmm", "vecdot", "mkldnn_linear", "qlinear"),
    "convolutions": ("conv", "convolution", "mkldnn_convolution"),
    "LayerNorm": ("layer_norm", "native_layer_norm"),
    "layout copies": ("copy_", "contiguous", "clone", "permute", "transpose", "reshape", "view", "flip", "cat", "stack",
                      "expand", "unsqueeze", "_unsafe_view", "as_strided", "slice", "select", "empty", "t"),
    "element-wise": ("gelu", "silu", "exp", "relu", "sub", "add", "mul", "div", "addcdiv", "rsqrt", "mean", "sum",
                     "elu", "clamp", "pow", "neg", "where"),
    "casts": ("_to_copy", "to"),
}


def kind_of(name: str, parents: list[str]) -> str:
    """The kind (a key of ``KINDS``, or "other") of an aten / mkldnn operator called under ``parents``
    (innermost first): a ``copy_`` is a cast under ``_to_copy``, the bias broadcast under ``addmm``,
    a layout copy otherwise."""
    raw = name.split("::")[-1]
    base = raw.rstrip("_")
    if raw == "copy_":
        if any(p.endswith("_to_copy") for p in parents):
            return "casts"
        if any(p.endswith(("addmm", "baddbmm")) for p in parents):
            return "matrix products"
        return "layout copies"
    for kind in ("casts", "matrix products", "convolutions", "LayerNorm", "element-wise", "layout copies"):
        if raw in KINDS[kind] or base in KINDS[kind]:
            return kind
    return "other"


def parent_names(event) -> list[str]:
    """Names of the operators ``event`` was called from, innermost first."""
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def load_models(fp32: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """(fast encoder, (1, 3, 1024, 1024) input) from the golden file, or random weights."""
    reference = build_encoder().eval()
    if GOLDEN.exists():
        golden = torch.load(GOLDEN, map_location="cpu", weights_only=True)
        reference.load_state_dict(golden["state_dict"])
        x = golden["input"]
    else:
        torch.manual_seed(0)
        x = torch.randn(1, 3, 1024, 1024)
    return FastHRMedSegEncoder.from_reference(reference, bf16=not fp32), x


def compiled(module: torch.nn.Module, x: torch.Tensor, label: str):
    """The AOTInductor package of ``module`` for ``x``'s shape, compiled into a temporary cache."""
    from hrmedseg.models.aot_cache import aot_key, compile_to_cache, load_compiled

    os.environ.setdefault("HRMEDSEG_CACHE_DIR", tempfile.mkdtemp())
    key = aot_key("profile", label, tuple(x.shape))
    fn = load_compiled(key)
    if fn is None:
        compile_to_cache(module, x, key)
        fn = load_compiled(key)
    return fn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--aot", action="store_true")
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fast, x = load_models(args.fp32)
    fn = compiled(fast, x, "fp32" if args.fp32 else "bf16") if args.aot else fast
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.calls):
                fn(x)
    averages = prof.key_averages(group_by_input_shape=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
                         max_shapes_column_width=70))
    by_kind: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        kind = kind_of(event.name, parent_names(event))
        by_kind[kind] += event.self_cpu_time_total
        counts[kind] += 1
    total = sum(by_kind.values())
    print(f"per call: {total / args.calls / 1e3:.1f} ms of self CPU time in operators (threads {args.threads})")
    print("| kind | ms per call | share | operator calls per call |")
    print("| --- | --- | --- | --- |")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / args.calls / 1e3:.1f} | {us / total:.0%} | {counts[kind] / args.calls:.0f} |")


if __name__ == "__main__":
    main()
