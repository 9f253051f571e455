"""Pick the fastest way to run the encoder and decoder on a device, and time things fairly.

Backends (each computes the same function; the reference is what the tests compare against):

- ``"reference"``: the plain PyTorch modules (``HRMedSegEncoder``, segment-anything's ``MaskDecoder``).
- ``"fast"``: ``FastHRMedSegEncoder`` / ``FastMaskDecoder`` in float32 (equal to the reference
  to rounding).
- ``"fast-bf16"``: the fast encoder with bfloat16 products (AMX CPUs, GPUs), rel. error ~1e-2.
- ``"onnxruntime"``: the exported encoder in an ONNX Runtime session (CPU), when installed.

``select_backend(device)`` returns the measured-fastest exact (float32) choice for a device,
from the figures in docs/benchmarks.md; ``bench/bench_encoder.py`` re-measures them.
The box engine (``hrmedseg.engine.BoxPredictor(backend="auto")``) takes its default from it;
it runs "reference", "fast" and "fast-bf16" and falls back to "fast" for "onnxruntime".
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("reference", "fast", "fast-bf16", "onnxruntime")


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls: median (the figure we report), min and all runs."""

    median: float
    minimum: float
    runs: tuple[float, ...]

    def __str__(self) -> str:
        return f"median {self.median * 1e3:.1f} ms (min {self.minimum * 1e3:.1f} ms, {len(self.runs)} runs)"


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` calls (``sync`` e.g. torch.cuda.synchronize)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - start)
    return Timing(statistics.median(runs), min(runs), tuple(runs))


def measure_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
) -> dict[str, Timing]:
    """Time several candidates round-robin (one call of each per round), so that load from other
    processes on a shared machine falls on all of them alike rather than on whichever ran last."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            runs[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(r), min(r), tuple(r)) for name, r in runs.items()}


def cpu_has_amx_bf16() -> bool:
    """True on x86 CPUs with AMX bf16 tiles (Sapphire Rapids and later), where bf16 products are fast."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def select_backend(device: str | torch.device = "cpu", allow_bf16: bool = False) -> str:
    """The default backend for ``device``.

    Exact (float32) backends only unless ``allow_bf16``: on CPUs the fast PyTorch path (ONNX
    Runtime was slower in our measurements, docs/benchmarks.md); on CUDA the fast path,
    in bf16 when allowed. ``HRMEDSEG_BACKEND`` overrides the choice (one of ``BACKENDS``).
    """
    forced = os.environ.get("HRMEDSEG_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"HRMEDSEG_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}")
        return forced
    device = torch.device(device)
    if allow_bf16 and (device.type == "cuda" or (device.type == "cpu" and cpu_has_amx_bf16())):
        return "fast-bf16"
    return "fast"


def build_fast_encoder(reference: torch.nn.Module, backend: str):
    """A callable encoder for ``backend`` built from a reference ``HRMedSegEncoder``."""
    from .fast_encoder import FastHRMedSegEncoder

    if backend == "reference":
        return reference.eval()
    if backend in ("fast", "fast-bf16"):
        return FastHRMedSegEncoder.from_reference(reference, bf16=backend == "fast-bf16")
    if backend == "onnxruntime":
        raise ValueError("build the onnxruntime encoder with hrmedseg.cli.export_onnx.OnnxEncoder from an exported file")
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Timing", "measure", "measure_interleaved", "select_backend", "build_fast_encoder", "cpu_has_amx_bf16"]
