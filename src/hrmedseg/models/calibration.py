"""Choose the CPU backend by measurement, once per machine: time the candidates, keep the fastest that agrees.

The fastest way to run the encoder differs between CPUs (AMX Xeons, AVX-512 EPYCs with
``avx512_bf16``, AVX2 laptops, Apple silicon), so a fixed rule cannot be right on all of them.
:func:`cpu_choice` answers from a JSON file in the user cache (:func:`calibration_path`) when it
holds an entry for this machine's :func:`calibration_key` (CPU model, torch version, thread
count); otherwise :func:`calibrate` times the candidate backends on the real encoder for a few
seconds and stores the result (atomic write: a crash never leaves a half-written file).

Candidates (:func:`candidate_backends`): "fast" (float32, exact) always; "fast-bf16" only where
the CPU reports bf16 instructions (:data:`BF16_FLAGS`), since elsewhere bf16 is emulated and
slow; "onnxruntime" when it is installed and the encoder's export is already in the user cache
(exporting takes about a minute on 2 cores, far over the few seconds calibration may take;
ONNX Runtime was measured slower than "fast" on both CPUs tried, docs/benchmarks.md). A
candidate counts only if the box masks it gives on a shipped sample (with the float32 fast
decoder) agree with float32's at mean Dice >= :data:`AGREEMENT_DICE` (the bar the shipped model's
bf16 masks were held to, docs/benchmarks.md). When "fast-bf16" wins, the decoder is timed in
float32 and bf16 as well, and bf16 kept only where it is faster and the pair still agrees
(:func:`choose_decoder_dtype`; ``BackendChoice.decoder_bf16``).

``HRMEDSEG_CALIBRATE=0`` skips the timing (the static rule of
:func:`hrmedseg.models.runtime.select_backend` applies); ``HRMEDSEG_BACKEND`` overrides both.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path

log = logging.getLogger(__name__)

#: Bumped when what is measured or how it is chosen changes, so older cached choices are measured again.
CALIBRATION_VERSION = 4  # 4: the decoder with in-place products (2026-12-08) changes the bf16 vs float32 decoder timing
#: How much faster than float32 ("fast") another backend must be to be chosen. Below it the
#: difference is timing noise (0.034 vs 0.035 s on the device machine's Xeon at 16 threads), and a
#: near-tie decided by noise would make masks depend on the thread count: a batch worker with 8
#: threads and a 16-thread loop then gave labels that differ in 4 pixels in 10,000.
MIN_SPEEDUP = 1.10
#: CPU feature flags that mean native bf16 products: AVX-512 BF16 (Zen 4, Cooper Lake and
#: later Xeons), AMX tiles (Sapphire Rapids and later), Arm's BF16 extension (``bf16`` in
#: /proc/cpuinfo, ``FEAT_BF16`` on macOS).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
#: Mean Dice between a candidate's masks and float32's below which the candidate is dropped.
AGREEMENT_DICE = 0.997
#: Sample the agreement is measured on, and how many of its boxes.
AGREEMENT_SAMPLE = "nuclei_stained"
AGREEMENT_BOXES = 32


def cpu_model() -> str:
    """The CPU model ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+", "Apple M2", ...)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        brand = _sysctl("machdep.cpu.brand_string")
        if brand:
            return brand
    return platform.processor() or platform.machine()


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: /proc/cpuinfo ``flags`` (x86) or ``Features`` (Arm); on macOS
    ``bf16`` when ``hw.optional.arm.FEAT_BF16`` is set."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin" and _sysctl("hw.optional.arm.FEAT_BF16") == "1":
        flags.add("bf16")
    return frozenset(flags)


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where the CPU reports bf16 instructions (any of :data:`BF16_FLAGS`)."""
    return bool(BF16_FLAGS & (cpu_flags() if flags is None else flags))


def onnxruntime_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def onnx_export_ready(model: nn.Module) -> bool:
    """True when ONNX Runtime is installed and ``model``'s encoder export is in the user cache."""
    from .onnx_export import cached_onnx_path

    return onnxruntime_installed() and cached_onnx_path(model.image_encoder).is_file()


def candidate_backends(flags: frozenset[str] | None = None, onnx: bool = False) -> list[str]:
    """Backends worth timing on this CPU: "fast", "fast-bf16" (bf16 CPUs only), "onnxruntime" (``onnx``)."""
    candidates = ["fast"]
    if cpu_has_bf16(flags):
        candidates.append("fast-bf16")
    if onnx:
        candidates.append("onnxruntime")
    return candidates


def calibration_key(threads: int | None = None) -> dict:
    """What a cached choice is valid for: a choice measured under another key is measured again."""
    return {
        "version": CALIBRATION_VERSION,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": int(threads or torch.get_num_threads()),
    }


def calibration_path() -> Path:
    """``calibration.json`` next to the weights cache (``HRMEDSEG_CACHE_DIR`` moves both)."""
    from ..weights.cache import cache_dir

    return cache_dir().parent / "calibration.json"


@dataclass(frozen=True)
class BackendChoice:
    """A measured CPU backend choice and why it was made.

    ``seconds``: median encoder call per candidate; ``dice``: mean Dice of its masks against
    float32's (1.0 for "fast" itself); ``rejected``: candidate -> why it was not kept.
    """

    backend: str
    key: dict
    seconds: dict[str, float] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    model: str = ""
    #: With "fast-bf16": the mask decoder in bf16 too (measured, :func:`choose_decoder_dtype`).
    decoder_bf16: bool = False
    #: Median ms per box of the float32 and bf16 decoders, when they were compared.
    decoder_ms: dict[str, float] = field(default_factory=dict)

    def reason(self) -> str:
        """One line for ``hrmedseg info`` and logs."""
        times = ", ".join(f"{name} {s:.3f} s" for name, s in sorted(self.seconds.items(), key=lambda kv: kv[1]))
        text = (f"fastest agreeing with float32 (and {MIN_SPEEDUP:.2f}x faster than it, else float32) on "
                f"{self.key['cpu']} at {self.key['threads']} threads ({times})")
        if self.rejected:
            text += "; not kept: " + ", ".join(f"{name} ({why})" for name, why in self.rejected.items())
        if self.decoder_ms:
            ms = ", ".join(f"{name} {v:.1f} ms" for name, v in self.decoder_ms.items())
            text += f"; decoder {'bf16' if self.decoder_bf16 else 'float32'} ({ms} per box)"
        return text


def load_choice(key: dict, path: Path | None = None) -> BackendChoice | None:
    """The cached choice for ``key``, or None (no file, another key, or an unreadable file)."""
    path = path or calibration_path()
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entry = entries.get(json.dumps(key, sort_keys=True)) if isinstance(entries, dict) else None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    try:
        return BackendChoice(**entry)
    except TypeError:  # written by another version of this class
        return None


def save_choice(choice: BackendChoice, path: Path | None = None) -> None:
    """Add ``choice`` to the cache file (other machines' entries are kept; written atomically)."""
    path = path or calibration_path()
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[json.dumps(choice.key, sort_keys=True)] = asdict(choice)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(entries, indent=1))


def agreement_input(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A shipped sample enlarged to the model's input size, normalised, and its boxes.

    Returns:
        x (1, 3, S, S) float32, the encoder's input; boxes (N, 4) xyxy in input pixels.
    """
    from ..data import load_sample, sample_boxes
    from ..io.boxes import read_boxes

    pixels = load_sample(AGREEMENT_SAMPLE)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    size = int(model.image_encoder.img_size)
    scale = size / max(pixels.shape[:2])
    image = torch.from_numpy(np.array(pixels[..., :3])).permute(2, 0, 1)[None].float()
    h, w = round(pixels.shape[0] * scale), round(pixels.shape[1] * scale)
    image = F.interpolate(image, (h, w), mode="bilinear", align_corners=False)
    x = (image - model.pixel_mean.cpu()) / model.pixel_std.cpu()
    x = F.pad(x, (0, size - w, 0, size - h))
    boxes = torch.from_numpy(read_boxes(sample_boxes(AGREEMENT_SAMPLE))[:AGREEMENT_BOXES]).float() * scale
    return x, boxes


def mask_dice(masks: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean Dice over N masks, (N, H, W) bool each (1 for a pair of empty masks)."""
    inter = (masks & expected).flatten(1).sum(1).float()
    total = (masks.flatten(1).sum(1) + expected.flatten(1).sum(1)).float()
    return float(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).mean())


def fastest_worth_it(seconds: dict[str, float], kept: list[str]) -> str:
    """The fastest of ``kept`` by ``seconds``; float32 ("fast") unless that one is :data:`MIN_SPEEDUP` faster."""
    if not kept:
        return "fast"
    best = min(kept, key=seconds.__getitem__)
    if best != "fast" and "fast" in kept and seconds["fast"] < MIN_SPEEDUP * seconds[best]:
        return "fast"
    return best


def calibrate(model: nn.Module, candidates: list[str], repeats: int = 3, model_name: str = "") -> BackendChoice:
    """Time ``candidates`` on ``model``'s encoder (round-robin, medians) and keep the fastest that agrees.

    ``model``: a float32 Sam-like model with an ``HRMedSegEncoder`` (on the CPU). A few seconds:
    one warm-up and ``repeats`` calls of each candidate at the model's input size.
    """
    from .fast_decoder import FastSamBoxDecoder
    from .runtime import build_fast_encoder, measure_interleaved

    reference = model.image_encoder
    x, boxes = agreement_input(model)
    # The engine's region-limited decoder (box + 8 low-res px): the masks the engine would give.
    decoder = FastSamBoxDecoder(model, margin=8)
    encoders, embeddings, rejected, dice = {}, {}, {}, {}
    with torch.no_grad():
        expected = None
        for name in candidates:
            try:
                encoders[name] = build_fast_encoder(reference, name, aot=False)  # eager: no compile jobs here
                embeddings[name] = encoders[name](x).float().contiguous()
                masks = decoder(embeddings[name], boxes)[0][:, 0] > 0
            except Exception as err:  # noqa: BLE001  (a candidate that cannot run is not chosen)
                rejected[name] = f"failed: {type(err).__name__}: {err}"[:120]
                encoders.pop(name, None)
                continue
            if name == "fast":  # first in the list: the float32 masks the others must match
                expected = masks
            elif expected is None:
                rejected[name] = "not compared: the float32 backend failed"
                continue
            dice[name] = mask_dice(masks, expected)
            if dice[name] < AGREEMENT_DICE:
                rejected[name] = f"mask Dice {dice[name]:.4f} < {AGREEMENT_DICE}"
        timings = measure_interleaved({name: (lambda e=e: e(x)) for name, e in encoders.items()}, repeats=repeats)
        seconds = {name: t.median for name, t in timings.items()}
        backend = fastest_worth_it(seconds, [name for name in seconds if name not in rejected])
        decoder_bf16, decoder_ms = False, {}
        if backend == "fast-bf16":
            decoder_bf16, decoder_ms = choose_decoder_dtype(decoder, model, embeddings[backend], boxes, expected, repeats)
    choice = BackendChoice(backend, calibration_key(), seconds, dice, rejected, model_name, decoder_bf16, decoder_ms)
    log.info("backend %s chosen: %s", backend, choice.reason())
    return choice


def choose_decoder_dtype(float32_decoder, model: nn.Module, embedding: torch.Tensor, boxes: torch.Tensor,
                         expected: torch.Tensor, repeats: int = 3) -> tuple[bool, dict[str, float]]:
    """Whether the bf16 encoder's pair should decode in bf16 too: (bf16?, ms per box of each).

    ``float32_decoder`` (calibration's ``FastSamBoxDecoder``) and a bf16 one for ``model`` are
    timed on ``embedding`` (the bf16 encoder's) and its ``boxes``, round-robin; bf16 is kept if it is :data:`MIN_SPEEDUP` faster and its masks still
    agree with float32's ``expected`` at :data:`AGREEMENT_DICE`. Which is faster differs by CPU
    and torch: bf16 took a quarter off on an AVX-512 EPYC (Zen 5, torch 2.14) and was slower on
    an AMX Xeon (torch 2.11; docs/benchmarks.md).
    """
    from .fast_decoder import FastSamBoxDecoder
    from .runtime import measure_interleaved

    decoders = {"float32": float32_decoder, "bf16": FastSamBoxDecoder(model, margin=float32_decoder.margin, dtype=torch.bfloat16)}
    try:
        agrees = mask_dice(decoders["bf16"](embedding, boxes)[0][:, 0] > 0, expected) >= AGREEMENT_DICE
        timings = measure_interleaved({name: (lambda d=d: d(embedding, boxes)) for name, d in decoders.items()}, repeats=repeats)
    except Exception as err:  # noqa: BLE001  (a bf16 decoder that cannot run is not chosen)
        log.info("bf16 decoder not usable here: %s", err)
        return False, {}
    ms = {name: 1000 * t.median / len(boxes) for name, t in timings.items()}
    return bool(agrees and ms["float32"] >= MIN_SPEEDUP * ms["bf16"]), ms


def cpu_choice(model: nn.Module | None = None, path: Path | None = None) -> BackendChoice:
    """This machine's measured CPU backend: from the cache, or calibrated now and cached.

    ``model``: the model to time, a float32 Sam-like model with an ``HRMedSegEncoder`` (default:
    the shipped box model, :data:`~hrmedseg.defaults.DEFAULT_BOX_MODEL`). Speed depends on the
    architecture, not the weights, so one choice serves every HRMedSeg model on the machine.
    """
    key = calibration_key()
    cached = load_choice(key, path)
    if cached is not None:
        return cached
    name = ""
    if model is None:
        from ..defaults import DEFAULT_BOX_MODEL
        from .loading import load_model

        name, model = DEFAULT_BOX_MODEL, load_model(DEFAULT_BOX_MODEL)
    model = model.eval().cpu()
    log.info("timing the encoder backends on this CPU once (%s); the choice is kept in %s", key["cpu"], path or calibration_path())
    choice = calibrate(model, candidate_backends(onnx=onnx_export_ready(model)), model_name=name or type(model).__name__)
    save_choice(choice, path)
    return choice


def calibration_enabled() -> bool:
    """False when ``HRMEDSEG_CALIBRATE=0`` (no timing; the static per-CPU rule applies)."""
    return os.environ.get("HRMEDSEG_CALIBRATE", "1") != "0"


__all__ = [
    "AGREEMENT_DICE", "BF16_FLAGS", "BackendChoice", "calibrate", "choose_decoder_dtype", "calibration_enabled", "calibration_key",
    "calibration_path", "candidate_backends", "cpu_choice", "cpu_flags", "cpu_has_bf16", "cpu_model",
    "load_choice", "save_choice",
]
