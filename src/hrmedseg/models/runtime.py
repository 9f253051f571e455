"""Pick the fastest way to run the encoder and decoder on a device, and time things fairly.

Backends (each computes the same function; the reference is what the tests compare against):

- ``"reference"``: the plain PyTorch modules (``HRMedSegEncoder``, segment-anything's ``MaskDecoder``).
- ``"fast"``: ``FastHRMedSegEncoder`` / ``FastMaskDecoder`` in float32 (equal to the reference
  to rounding).
- ``"fast-bf16"``: the fast encoder with bfloat16 products (CPUs with bf16 instructions, GPUs), rel. error ~1e-2.
- ``"onnxruntime"``: the exported encoder in an ONNX Runtime session (CPU), when installed.

``select_backend(device)`` returns the measured-fastest choice for a device: on CPUs measured on
the machine itself once and cached (:mod:`hrmedseg.models.calibration`), on GPUs from the
figures in docs/benchmarks.md (``bench/bench_encoder.py`` and ``bench/bench_gpu.py`` re-measure them).
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
    from .calibration import cpu_flags

    return "amx_bf16" in cpu_flags()


def calibratable(model: torch.nn.Module | None) -> bool:
    """True for a float32 Sam-like model with an ``HRMedSegEncoder`` (what calibration can time)."""
    from .neck import HRMedSegEncoder

    encoder = getattr(model, "image_encoder", None)
    return isinstance(encoder, HRMedSegEncoder) and next(encoder.parameters()).dtype == torch.float32


def select_backend(device: str | torch.device = "cpu", allow_bf16: bool = True, model: torch.nn.Module | None = None) -> str:
    """The default backend for ``device``: the fastest one measured there.

    On CUDA "fast-bf16" (bf16 weights and activations, CUDA graphs: 1.7 ms per 1024 x 1024 image
    on an H100 against 3.4 ms for "fast" in float32; docs/benchmarks.md).
    On the CPU the choice is measured on this machine, once
    (:func:`hrmedseg.models.calibration.cpu_choice`: the candidates timed on the real encoder
    for a few seconds, the fastest whose masks agree with float32's kept, cached in the user cache
    per CPU model, torch version and thread count). ``model`` is timed if it has an HRMedSeg
    encoder, else the shipped box model. With ``HRMEDSEG_CALIBRATE=0`` a static rule applies:
    "fast-bf16" on CPUs with AMX tiles, "fast" (float32, exact) elsewhere.
    ``allow_bf16=False`` keeps exact float32 everywhere.
    ``HRMEDSEG_BACKEND`` overrides the choice (one of ``BACKENDS``).
    """
    forced = os.environ.get("HRMEDSEG_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"HRMEDSEG_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}")
        return forced
    device = torch.device(device)
    if not allow_bf16:
        return "fast"
    if device.type == "cuda":
        return "fast-bf16"
    if device.type == "cpu":
        from .calibration import calibration_enabled, cpu_choice

        if calibration_enabled():
            return cpu_choice(model if calibratable(model) else None).backend
        if cpu_has_amx_bf16():
            return "fast-bf16"
    return "fast"


def cuda_graphs_enabled() -> bool:
    """CUDA graphs for the fast encoder on GPUs, unless ``HRMEDSEG_CUDA_GRAPHS=0``."""
    return os.environ.get("HRMEDSEG_CUDA_GRAPHS", "1") != "0"


def decoder_dtype(backend: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The fast mask decoder's dtype under ``backend``: bf16 for "fast-bf16" on a CPU whose
    calibration measured the bf16 decoder faster there and agreeing with float32
    (``BackendChoice.decoder_bf16``, read from the cache, never measured here); float32 otherwise,
    on GPUs, and wherever no calibration is cached (``HRMEDSEG_CALIBRATE=0``)."""
    if backend != "fast-bf16" or torch.device(device).type != "cpu":
        return torch.float32
    from .calibration import calibration_enabled, calibration_key, load_choice

    choice = load_choice(calibration_key()) if calibration_enabled() else None
    return torch.bfloat16 if choice is not None and choice.backend == "fast-bf16" and choice.decoder_bf16 else torch.float32


def build_fast_encoder(reference: torch.nn.Module, backend: str, compile: bool = False, aot: bool | str | None = None):
    """A callable encoder for ``backend`` built from a reference ``HRMedSegEncoder``, on its device.

    On a CUDA device the fast backends are replayed as CUDA graphs (``CudaGraphRunner``, one per
    input shape; ``HRMEDSEG_CUDA_GRAPHS=0`` turns that off). "fast-bf16" keeps its weights and
    activations in bfloat16 on every device (no autocast casts: half the memory traffic; same
    error). ``compile=True`` first passes the fast module through ``torch.compile`` (inductor,
    whole graph): on an H100 the fastest encoder at large batches, but the first call of each
    input shape compiles for about a minute (docs/benchmarks.md). On the CPU with
    ``HRMEDSEG_AOT=1`` (or ``aot=True``) the fast module is compiled ahead of time once per machine
    and cached (:class:`hrmedseg.models.aot_cache.AotEncoder`: the eager module serves until it is
    ready); ``aot="reuse"`` (batch workers) loads such a package where one was compiled before and
    compiles none; ``aot=False`` never uses one (:func:`hrmedseg.models.aot_cache.aot_mode`).
    "onnxruntime" (CPU only) exports the reference once per weights into the user cache and runs it in ONNX Runtime
    (:func:`hrmedseg.models.onnx_export.cached_onnx_encoder`).
    """
    from .aot_cache import AotEncoder, aot_mode
    from .cuda_graph import CudaGraphRunner
    from .fast_encoder import FastHRMedSegEncoder

    if backend == "reference":
        return reference.eval()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    on_cuda = next(reference.parameters()).device.type == "cuda"
    if backend == "onnxruntime":
        if on_cuda:
            raise ValueError("backend 'onnxruntime' runs on the CPU only; use 'fast-bf16' or 'fast' on a GPU")
        from .onnx_export import cached_onnx_encoder

        return cached_onnx_encoder(reference)
    encoder = FastHRMedSegEncoder.from_reference(reference, bf16=backend == "fast-bf16")
    if compile:
        encoder = torch.compile(encoder, fullgraph=True, dynamic=False)
    elif not on_cuda and (mode := aot_mode(aot)) != "off":
        from .onnx_export import weights_digest

        encoder = AotEncoder(encoder, weights_digest(reference)[:20], backend, compile_missing=mode == "compile")
    if on_cuda and cuda_graphs_enabled():
        return CudaGraphRunner(encoder)
    return encoder


__all__ = ["BACKENDS", "cuda_graphs_enabled", "Timing", "measure", "measure_interleaved", "select_backend", "build_fast_encoder", "cpu_has_amx_bf16"]
