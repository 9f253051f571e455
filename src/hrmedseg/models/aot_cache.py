"""Ahead-of-time compiled encoders (torch.export + AOTInductor), built once per machine and reused.

``torch.compile`` pays its compilation (a minute or more on 2 cores) in every new process. Here
the fast encoder is exported and compiled by AOTInductor into a ``.pt2`` package in the user
cache (:func:`aot_cache_dir`), in a background thread the first time while the uncompiled
module serves; from the next session on the package loads in well under a second.

A package is only valid for what it was compiled for, so it is stored under its
:func:`aot_key` (weights digest, backend, input shape, CPU model, CPU flags, torch version) and
loaded only when the key written beside it equals the current one: a cache copied from
another CPU or left by another torch version is never used (it is compiled again).

A new package is first loaded and run once in a child process (:func:`check_in_child`), and its
key is written only when that child exits cleanly: on torch 2.11.0+cu130 (the lent GPU machine's
image) loading a package crashed the process with a segmentation fault, which no ``except`` can
catch, and in the annotator that would lose unsaved work. A package that fails the check is
deleted and its key recorded as refused (``.refused``), so the eager encoder serves from then on
without compiling again.

When: ``HRMEDSEG_AOT=1`` / ``HRMEDSEG_AOT=0`` turn it on / off everywhere. Unset, packages are
compiled where a long session asks for it (the napari annotator: a first session pays 20-60 s of
background compilation on 2 cores, every later one gets the compiled encoder, 0.32x of the
authors' against 0.40-0.44x eager on an AMX CPU) and a C++ compiler is found (AOTInductor needs
one); one-shot calls (the CLI, ``BoxPredictor()``) leave it off: they would end before a package
is written, and loading one costs about 1.2 s (importing torch._inductor 1.1 s, the package 0.15 s
on the AMD EPYC VM), which a call of a few crops never wins back (14 ms per 1024^2 crop there).
Batch workers, which encode many crops each, use a package compiled earlier on this machine
and compile none (``aot="reuse"``, :func:`aot_mode`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import atomic_path

log = logging.getLogger(__name__)

#: Bumped when the packages' contents change meaning.
AOT_VERSION = 2
#: What the check process runs: load the package (argv 1) and call it once on zeros of the shape
#: (argv 2, comma-separated) and dtype (argv 3).
CHECK_SCRIPT = (
    "import sys, torch; f = torch._inductor.aoti_load_package(sys.argv[1]); "
    "f(torch.zeros([int(n) for n in sys.argv[2].split(',')], dtype=getattr(torch, sys.argv[3])))"
)
CHECK_TIMEOUT_S = 600


def cxx_compiler_found() -> bool:
    """True when the C++ compiler AOTInductor builds with is on the PATH (``$CXX``, else c++, g++ or clang++)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return any(shutil.which(name) for name in names)


def aot_setting() -> bool | None:
    """``HRMEDSEG_AOT``: True for "1", False for "0", None when unset (or anything else)."""
    return {"1": True, "0": False}.get(os.environ.get("HRMEDSEG_AOT", ""))


def aot_enabled(default: bool = False) -> bool:
    """Whether CPU encoders are compiled ahead of time and cached: ``HRMEDSEG_AOT=1`` / ``0``
    decide; unset, ``default`` (True for long sessions) where a C++ compiler is found."""
    setting = aot_setting()
    if setting is not None:
        return setting
    return default and cxx_compiler_found()


def aot_mode(aot: bool | str | None) -> str:
    """What an encoder built with ``aot`` does: "compile" (load its package, else build it in the
    background), "reuse" (load a package compiled earlier on this machine, compile none) or "off".

    ``aot=True`` / ``False`` decide; ``None`` and ``"reuse"`` follow ``HRMEDSEG_AOT`` (1: compile,
    0: off) and, unset, are "off" and "reuse"."""
    if isinstance(aot, bool):
        return "compile" if aot else "off"
    if aot not in (None, "reuse"):
        raise ValueError(f"aot must be True, False, None or 'reuse', got {aot!r}")
    setting = aot_setting()
    if setting is not None:
        return "compile" if setting else "off"
    return "off" if aot is None else "reuse"


def aot_cache_dir() -> Path:
    """``aot/`` next to the weights cache (``HRMEDSEG_CACHE_DIR`` moves both)."""
    from ..weights.cache import cache_dir

    return cache_dir().parent / "aot"


def aot_key(weights: str, variant: str, shape: tuple[int, ...]) -> dict:
    """What a compiled package is valid for: ``weights`` (digest), ``variant`` (e.g. the backend),
    the input ``shape``, and this machine's CPU model and flags and torch version."""
    from .calibration import cpu_flags, cpu_model

    return {
        "version": AOT_VERSION,
        "weights": weights,
        "variant": variant,
        "shape": list(shape),
        "cpu": cpu_model(),
        "cpu_flags": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16],
        "torch": torch.__version__,
    }


def package_path(key: dict) -> Path:
    """The package file of ``key`` (its key is written beside it, ``.json``)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return aot_cache_dir() / f"{key['variant']}-{digest}.pt2"


def key_file_holds(file: Path, key: dict) -> bool:
    """True when ``file`` (a package's ``.json`` or ``.refused``) holds exactly ``key``."""
    try:
        return json.loads(file.read_text()) == key
    except (OSError, ValueError):
        return False


def write_key_file(file: Path, key: dict) -> None:
    """``key`` as JSON into ``file``, through a temporary file and a rename."""
    with atomic_path(file) as tmp:
        tmp.write_text(json.dumps(key, sort_keys=True))


def load_compiled(key: dict) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The cached package for ``key``, loaded; None when there is none, or its key differs, or it cannot load."""
    path = package_path(key)
    if not key_file_holds(path.with_suffix(".json"), key) or not path.is_file():
        return None
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as err:  # noqa: BLE001  (a truncated or foreign file: compile again)
        log.warning("compiled encoder %s could not be loaded (%s); compiling it again", path, err)
        return None


def refused(key: dict) -> bool:
    """True when a package compiled for ``key`` failed :func:`check_in_child` on this machine."""
    return key_file_holds(package_path(key).with_suffix(".refused"), key)


def check_in_child(path: Path, example: torch.Tensor) -> str | None:
    """None when the package at ``path`` loads and runs on zeros like ``example`` in a child
    process; else why not (its exit status and last stderr line)."""
    shape = ",".join(str(n) for n in example.shape)
    dtype = str(example.dtype).removeprefix("torch.")
    try:
        done = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, str(path), shape, dtype],
                              capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the check process did not finish in {CHECK_TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return f"the check process exited with status {done.returncode}" + (f" ({last})" if last else "")


def compile_to_cache(module: nn.Module, example: torch.Tensor, key: dict) -> Path:
    """Export ``module`` at ``example``'s shape, compile it with AOTInductor and store it under ``key``.

    The package and then its key are each written to a temporary file and renamed, so a crash
    leaves no package that :func:`load_compiled` would accept; the key is written only after
    :func:`check_in_child` passed. Raises RuntimeError (and records the key as refused) when it
    did not.
    """
    path = package_path(key)
    with torch.no_grad():
        module(example)  # fill the module's per-shape tables first: they become constants
        program = torch.export.export(module, (example,), strict=False)
    with atomic_path(path) as tmp:
        staged = tmp.with_suffix(".pt2")  # AOTInductor wants the .pt2 suffix
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(staged))
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    problem = check_in_child(path, example)
    if problem is not None:
        path.unlink(missing_ok=True)
        write_key_file(path.with_suffix(".refused"), key)
        raise RuntimeError(f"compiled package {path.name} failed its check: {problem}; the uncompiled encoder is used")
    write_key_file(path.with_suffix(".json"), key)
    return path


class AotEncoder:
    """An encoder that runs the AOT-compiled package where one is cached, the eager module meanwhile.

    ``encoder(x (1, 3, S, S)) -> same as eager(x)``. If no package matches the key of the first
    input's shape, one is compiled in a background thread (``background=False``: now, in the
    caller's thread) and used as soon as it is ready; with ``compile_missing=False`` none is
    compiled and the eager module serves. Inputs of other shapes run eagerly.
    """

    def __init__(self, eager: nn.Module, weights: str, variant: str, background: bool = True,
                 compile_missing: bool = True) -> None:
        self.eager = eager
        self.weights = weights
        self.variant = variant
        self.background = background
        self.compile_missing = compile_missing
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.shape: tuple[int, ...] | None = None
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str):  # bf16, config, img_size, ... of the eager module
        if name == "eager":
            raise AttributeError(name)
        return getattr(self.eager, name)

    def _compile(self, module: nn.Module, example: torch.Tensor, key: dict) -> None:
        try:
            log.info("compiling the %s encoder for %s ahead of time (once per machine)", self.variant, tuple(example.shape))
            compile_to_cache(module, example, key)
            self.compiled = load_compiled(key)
        except Exception as err:  # noqa: BLE001  (the eager module keeps serving)
            log.warning("ahead-of-time compilation of the %s encoder failed: %s", self.variant, err)

    def _start(self, x: torch.Tensor) -> None:
        with self._lock:
            if self.shape is not None:
                return
            self.shape = tuple(x.shape)
            key = aot_key(self.weights, self.variant, self.shape)
            self.compiled = load_compiled(key)
            if self.compiled is None and refused(key):
                log.info("the %s encoder's compiled package failed its check on this machine; running it uncompiled", self.variant)
            elif self.compiled is None and self.compile_missing:
                example = torch.zeros_like(x)
                if self.background:  # started after this call's eager result: the first box is not slowed
                    # torch.export swaps a module's parameters for fake tensors while it traces, so
                    # the thread exports its own copy: the served module must never see them (the
                    # eager calls beside it failed "fake_mode.in_kernel_invocation must be False").
                    module = copy.deepcopy(self.eager)
                    self.thread = threading.Thread(target=self._compile, args=(module, example, key), daemon=True)
                else:
                    self._compile(self.eager, example, key)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape is None:
            self._start(x)
        if self.compiled is not None and tuple(x.shape) == self.shape:
            return self.compiled(x)
        out = self.eager(x)
        thread = self.thread
        if thread is not None and thread.ident is None:
            with self._lock:
                if thread.ident is None:
                    thread.start()
        return out


__all__ = ["AOT_VERSION", "AotEncoder", "aot_cache_dir", "aot_enabled", "aot_mode", "aot_setting", "aot_key", "check_in_child", "compile_to_cache",
           "load_compiled", "package_path", "refused"]
