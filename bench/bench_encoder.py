"""Image encoder speed on the CPU: fast LGViT + neck vs the reference and MobileSAM's TinyViT.

    .venv/bin/python bench/bench_encoder.py [--threads 2] [--repeats 5] [--size 1024] [--onnx] [--compile] [--aot]
        [--baseline-src OTHER_CHECKOUT/src]

All candidates run in the same process, round-robin (one call of each per round), on one
(1, 3, size, size) input; figures are wall-clock medians and minima. The LGViT + neck
weights are the golden file's (the authors' layout, /work/shared/reference/lgvit_neck_golden.pt,
random weights; ``HRMEDSEG_GOLDEN`` names it elsewhere) when present; each fast variant's relative L2 error to the reference output is
printed beside its time. MobileSAM's TinyViT (pip package mobilesam-mirror) is built with random
weights; if timm is not installed, a minimal stand-in for the three timm helpers it imports is used.
``--baseline-src`` also times the fast encoders of another checkout's sources (e.g. a ``git
worktree`` of main), built from the same reference weights, in the same rounds (with ``--aot``
their AOTInductor packages too).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

from hrmedseg.models import build_encoder
from hrmedseg.models.fast_encoder import FastHRMedSegEncoder
from hrmedseg.models.runtime import measure_interleaved
from report import cpu_summary

# HRMEDSEG_GOLDEN: the golden file elsewhere (a git worktree has no ../shared beside it).
GOLDEN = Path(os.environ.get("HRMEDSEG_GOLDEN") or Path(__file__).resolve().parents[2] / "shared" / "reference" / "lgvit_neck_golden.pt")


def _timm_stand_in() -> None:
    """Register the timm names TinyViT imports (DropPath, to_2tuple, trunc_normal_, register_model)."""
    if importlib.util.find_spec("timm") is not None:
        return
    layers = types.ModuleType("timm.models.layers")

    class DropPath(torch.nn.Identity):  # drop_path_rate is 0 in MobileSAM: identity at inference
        def __init__(self, *args, **kwargs) -> None:
            super().__init__()

    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    timm.models, models.layers, models.registry = models, layers, registry
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def mobilesam_tinyvit() -> torch.nn.Module | None:
    """MobileSAM's image encoder (TinyViT-5M, as in mobile_sam.build_sam_vit_t), random weights."""
    _timm_stand_in()
    try:
        from mobile_sam.modeling.tiny_vit_sam import TinyViT
    except ImportError as err:
        print(f"MobileSAM TinyViT skipped: {err}")
        return None
    return TinyViT(
        img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
        use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    ).eval()


def baseline_fast_encoder_class(src: Path) -> type:
    """``FastHRMedSegEncoder`` of the checkout whose package is ``src/hrmedseg``, imported as
    ``hrmedseg_baseline.models.fast_encoder`` beside this checkout's (its relative imports,
    ``fused_linear``, ``lgvit``, ... resolve within the baseline's files)."""
    name = "hrmedseg_baseline"
    package = src / "hrmedseg"
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py", submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.models.fast_encoder").FastHRMedSegEncoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--onnx", action="store_true", help="also time the exported encoder in onnxruntime")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the fast encoder (slow to compile)")
    parser.add_argument("--aot", action="store_true", help="also time the AOTInductor-compiled fast encoders (compiled once into a temporary cache)")
    parser.add_argument("--no-mobilesam", action="store_true")
    parser.add_argument("--baseline-src", type=Path, help="also time the fast encoders of this checkout's src/ (same weights)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = build_encoder().eval()
    if GOLDEN.exists():
        golden = torch.load(GOLDEN, map_location="cpu", weights_only=True)
        reference.load_state_dict(golden["state_dict"])
        x = golden["input"] if args.size == 1024 else torch.randn(1, 3, args.size, args.size)
        print(f"weights and input: {GOLDEN}")
    else:
        x = torch.randn(1, 3, args.size, args.size)
        print("golden file not found: random weights")
    fast = FastHRMedSegEncoder.from_reference(reference)
    fast_bf16 = FastHRMedSegEncoder.from_reference(reference, bf16=True)
    with torch.inference_mode():
        expected = reference(x)
    candidates = {
        "LGViT + neck, reference (authors' layout)": reference,
        "LGViT + neck, fast fp32": fast,
        "LGViT + neck, fast bf16": fast_bf16,
    }
    if args.baseline_src:
        baseline = baseline_fast_encoder_class(args.baseline_src.resolve())
        candidates["LGViT + neck, fast fp32 (baseline sources)"] = baseline.from_reference(reference)
        candidates["LGViT + neck, fast bf16 (baseline sources)"] = baseline.from_reference(reference, bf16=True)
    if args.onnx:
        from hrmedseg.models.onnx_export import OnnxEncoder, export_encoder

        path = Path(tempfile.mkdtemp()) / "encoder.onnx"
        export_encoder(reference, path, size=args.size)
        candidates["LGViT + neck, onnxruntime fp32"] = OnnxEncoder(path, threads=args.threads)
    if args.compile:
        compiled = torch.compile(fast, dynamic=False)
        candidates["LGViT + neck, fast fp32 + torch.compile"] = compiled
    if args.aot:
        import time

        from hrmedseg.models.aot_cache import compile_to_cache, load_compiled, aot_key

        os.environ.setdefault("HRMEDSEG_CACHE_DIR", tempfile.mkdtemp())
        modules = [("fast fp32", fast), ("fast bf16", fast_bf16)]
        if args.baseline_src:
            modules += [(f"{label} (baseline sources)", candidates[f"LGViT + neck, {label} (baseline sources)"])
                        for label in ("fast fp32", "fast bf16")]
        for label, module in modules:
            key = aot_key("bench", label, tuple(x.shape))
            start = time.perf_counter()
            compiled = load_compiled(key)
            if compiled is None:
                compile_to_cache(module, x, key)
                compiled = load_compiled(key)
            print(f"AOTInductor {label}: export + compile (or cache load) {time.perf_counter() - start:.1f} s")
            candidates[f"LGViT + neck, {label} + AOTInductor"] = compiled
    if not args.no_mobilesam:
        tinyvit = mobilesam_tinyvit()
        if tinyvit is not None:
            candidates["MobileSAM TinyViT (random weights)"] = tinyvit

    errors = {}
    with torch.inference_mode():
        for name, model in candidates.items():
            if name.startswith("LGViT") and "reference" not in name:
                out = model(x)
                errors[name] = ((out.float() - expected).norm() / expected.norm()).item()
        calls = {name: (lambda m=model: m(x)) for name, model in candidates.items()}
        timings = measure_interleaved(calls, repeats=args.repeats, warmup=1)
    print(f"threads {args.threads}, input {tuple(x.shape)}, torch {torch.__version__}, {args.repeats} rounds")
    print("CPU: " + ", ".join(f"{k} {v}" for k, v in cpu_summary().items()))
    baseline = timings["LGViT + neck, reference (authors' layout)"].median
    print("| encoder | median s | min s | median / authors' | rel. L2 error to reference |")
    print("| --- | --- | --- | --- | --- |")
    for name, timing in timings.items():
        err = f"{errors[name]:.1e}" if name in errors else ""
        print(f"| {name} | {timing.median:.3f} | {timing.minimum:.3f} | {timing.median / baseline:.2f}x | {err} |")


if __name__ == "__main__":
    main()
