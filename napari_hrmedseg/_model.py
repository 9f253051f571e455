"""Model choices of the dock and loading them (runs in a worker thread; torch is imported here only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrmedseg.hashing import sha256_file
from hrmedseg.model_kinds import MODEL_KINDS

from ._state import ModelInfo

#: the choice that builds a randomly initialised HRMedSegSAM (tests, layout screenshots)
UNTRAINED_CHOICE = "untrained (random weights: testing only)"
DEVICES = ("auto", "cuda", "mps", "cpu")
UNTRAINED_BANNER = "untrained weights: masks are meaningless"

# registry kinds that hold something BoxPredictor can run on its own; decoders and bare
# encoders are parts of such models
_RUNNABLE_KINDS = {"sam", "sam2", "model", "box_model", "litemedsam"} | {k.architecture for k in MODEL_KINDS if k.box_prompted}


def registry_choices() -> list[str]:
    """Registry names a box model can be loaded from (empty if the registry file is broken)."""
    from hrmedseg.weights.registry import list_weights  # here: hrmedseg.weights imports torch

    try:
        entries = list_weights()
    except Exception:  # a broken registry file must not break the dock; the CLI reports it
        return []
    runnable = [e.name for e in entries if getattr(e, "kind", None) in _RUNNABLE_KINDS] or [e.name for e in entries]
    # HRMedSeg's own weights first (the engine's default box model among them), then SAM / SAM2
    return sorted(runnable, key=lambda name: (not name.startswith("hrmedseg"), runnable.index(name)))


@dataclass
class MissingWeights:
    """A registry name whose file is not on this computer (what the dock offers to fix)."""

    name: str
    file: str
    message: str
    can_download: bool


def check_weights(name: str) -> MissingWeights | None:
    """None if ``name`` resolves to a local verified file; otherwise what is missing (no download)."""
    from hrmedseg.errors import WeightsError
    from hrmedseg.weights import registry

    try:
        registry.resolve(name, download=False)
    except WeightsError as err:
        entry = registry.get_entry(name)
        return MissingWeights(name, entry.file, str(err), can_download=entry.url is not None)
    return None


def download_weights(name: str) -> Path:
    """Download ``name`` into the cache (WeightsError explains an offline or failed download)."""
    from hrmedseg.weights import registry

    return registry.fetch(name)


def guard_torch_import() -> None:
    """Keep torch from loading triton inside a running napari (call before the first torch import).

    torch._dynamo (pulled in by torchvision) imports triton when it is installed; triton's bundled
    LLVM crashes the process (segmentation fault in ``triton._C.libtriton``) when Mesa's LLVM-based
    OpenGL driver (llvmpipe under Xvfb, radeonsi on AMD) is already loaded, which is the case once
    napari has a canvas. Box prediction never compiles kernels, so triton is not needed here.
    Set HRMEDSEG_ALLOW_TRITON=1 to skip this (e.g. when triton was imported before napari).
    """
    import sys

    if os.environ.get("HRMEDSEG_ALLOW_TRITON") == "1" or "triton" in sys.modules:
        return
    sys.modules["triton"] = None  # type: ignore[assignment]  # 'import triton' -> ImportError


def load_predictor(choice: str | os.PathLike | Any, device: str = "auto") -> tuple[Any, ModelInfo]:
    """A BoxPredictor for a dock choice: a registry name, a file path, ``UNTRAINED_CHOICE`` or a model.

    Returns (predictor, ModelInfo). Raises hrmedseg's WeightsError when weights are missing.
    """
    guard_torch_import()
    from hrmedseg.engine import BoxPredictor
    from hrmedseg.models.aot_cache import aot_enabled

    # An annotator session is long: its encoder is compiled ahead of time in the background
    # (once per machine) where a C++ compiler is found, unless HRMEDSEG_AOT=0; without a
    # compiler, "reuse" still uses a package compiled before.
    aot = True if aot_enabled(default=True) else "reuse"

    if isinstance(choice, str) and choice == UNTRAINED_CHOICE:
        from hrmedseg.models import build_hrmedseg_sam

        return BoxPredictor(build_hrmedseg_sam(), device=device), ModelInfo(name="untrained-random", untrained=True)
    if isinstance(choice, (str, os.PathLike)) and (os.sep in str(choice) or Path(choice).is_file()):
        path = Path(choice).expanduser().resolve()
        predictor = BoxPredictor(str(path), device=device, disk_cache=True, aot=aot)  # reopened images skip the encoder
        info = ModelInfo(name=path.name, path=str(path), sha256=sha256_file(path))
    elif isinstance(choice, str):
        from hrmedseg.weights import registry

        path = registry.resolve(choice, download=False)
        predictor = BoxPredictor(choice, device=device, disk_cache=True, aot=aot)
        info = ModelInfo(name=choice, path=str(path), sha256=sha256_file(path))
    else:  # a model object (tests, notebooks)
        predictor = BoxPredictor(choice, device=device)
        info = ModelInfo(name=getattr(choice, "name", type(choice).__name__))
    # The loader's typed record says whether the bundle's provenance marks the weights untrained.
    info.untrained = info.untrained or predictor.metadata.untrained
    return predictor, info
