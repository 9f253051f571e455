"""glibc malloc settings that keep freed tensor memory for reuse: fewer page faults on CPUs.

Why: PyTorch's CPU tensors come straight from ``malloc``. glibc serves large blocks with fresh
``mmap`` pages and hands memory at the top of its heap back to the kernel once more than
``M_TRIM_THRESHOLD`` is free, so a decoder call that allocates a few 4 MiB image-side tensors
touches new pages every time: one page fault per 4 KiB. On the 2-core development VM the 200
boxes of ``bench/bench_engine.py`` took 115-290 k minor faults per ``segment()`` call (about a
gigabyte of first touches) and 22-58 k with the settings below, which took 6% off the call
(docs/benchmarks.md, "Fewer page faults").

The settings: blocks under ``MMAP_THRESHOLD_BYTES`` come from the heap, and up to
``TRIM_THRESHOLD_BYTES`` of free memory stays there for the next call. Larger blocks (image
tiles, whole-slide buffers) are still mapped and unmapped one by one, so the memory kept is
bounded by the trim threshold.

``keep_freed_memory()`` applies them once per process (the engine calls it for CPU devices).
It does nothing off glibc (macOS, Windows, musl), where ``HRMEDSEG_MALLOC_TUNING=0`` is set, or
where the user set glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (theirs
win). The same settings as environment variables, for any process:
``MALLOC_MMAP_THRESHOLD_=16777216 MALLOC_TRIM_THRESHOLD_=67108864``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 << 20
TRIM_THRESHOLD_BYTES = 64 << 20
ENV_SWITCH = "HRMEDSEG_MALLOC_TUNING"
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_state: dict[str, str] = {}


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> str:
    """Apply the settings once per process; returns what was done (``hrmedseg info`` prints it)."""
    if "status" not in _state:
        _state["status"] = _apply()
        log.debug("malloc tuning: %s", _state["status"])
    return _state["status"]


def _apply() -> str:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"off ({ENV_SWITCH}=0)"
    if any(name in os.environ for name in GLIBC_ENV):
        return "left to the MALLOC_*_ environment variables set"
    libc = _glibc()
    if libc is None:
        return "not applicable (not glibc)"
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        return "refused by mallopt"
    return f"on (glibc: mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, trim threshold {TRIM_THRESHOLD_BYTES >> 20} MiB)"


__all__ = ["keep_freed_memory", "MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES"]
