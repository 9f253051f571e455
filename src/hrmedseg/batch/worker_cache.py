"""One model per Dask worker: loaded by the first task that needs it, reused by the next ones.

:class:`WorkerSetup` (a Dask ``WorkerPlugin``) prepares every worker before its first task: it
sets torch's thread count, so N workers on a machine share its cores instead of each starting
one thread per core, and restores glibc's malloc thresholds that Dask's nanny turns off (see
:func:`tune_malloc`). Models are kept on the worker object (``get_worker()``), keyed by what
they were built from; outside a worker (a run without a cluster) a process-wide dict plays that
role.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import threading
from typing import Any, Callable, TypeVar

from distributed import WorkerPlugin

_LOCAL: dict[str, Any] = {"models": {}, "loads": {}}
_LOCK = threading.Lock()
_T = TypeVar("_T")
# Allocations below MMAP_THRESHOLD reuse freed heap memory instead of a fresh mmap each; the trim
# threshold is twice it, as glibc's dynamic rule sets it (mallopt(3)). 8 MiB, not glibc's warmed-up
# 32 MiB: measured (docs/benchmarks.md, issue 14), an auto-mode DSB image has 46k page faults at
# 8 MiB, 23k at 32 MiB, 276k under Dask's setting, for the same CPU time at 8 and 32 MiB, while the
# 40000^2 slide's worker peak RSS is 875 MiB at 8 MiB, 962 MiB at 32 MiB (836 MiB before).
MMAP_THRESHOLD = 8 * 2**20
TRIM_THRESHOLD = 16 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


class WorkerSetup(WorkerPlugin):
    """Runs on each worker as it starts (and on workers that join or restart later).

    ``torch_threads``: torch's intra-op threads in this worker; None, for a cluster whose workers
    were sized by whoever started them: the worker's ``OMP_NUM_THREADS`` if set, else unchanged.
    """

    name = "hrmedseg-worker-setup"

    def __init__(self, torch_threads: int | None) -> None:
        self.torch_threads = None if torch_threads is None else int(torch_threads)

    def threads(self) -> int | None:
        """The torch thread count this worker gets (None: leave torch's own)."""
        if self.torch_threads is not None:
            return max(1, self.torch_threads)
        given = os.environ.get("OMP_NUM_THREADS", "")
        return int(given) if given.isdigit() and int(given) > 0 else None

    def setup(self, worker: Any) -> None:
        tune_malloc()
        threads = self.threads()
        if threads is not None:
            import torch

            # Before any task: torch keeps this count for every thread that runs ops later (Dask's
            # task thread included). Without it torch would follow the nanny's MKL_NUM_THREADS=1
            # (its default pre-spawn-environ) and run one thread whatever OMP_NUM_THREADS says.
            torch.set_num_threads(threads)
        if not hasattr(worker, "_hrmedseg"):  # registered again (a second run on the cluster): keep its models
            worker._hrmedseg = {"models": {}, "loads": {}}


def _state() -> dict[str, Any]:
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:  # not running in a Dask worker
        return _LOCAL
    if not hasattr(worker, "_hrmedseg"):
        worker._hrmedseg = {"models": {}, "loads": {}}
    return worker._hrmedseg


def cached(key: str, build: Callable[[], Any]) -> tuple[Any, int]:
    """``(model, times it was built in this worker)``: ``build()`` runs once per worker and key."""
    state = _state()
    with _LOCK:
        if key not in state["models"]:
            state["models"][key] = build()
            state["loads"][key] = state["loads"].get(key, 0) + 1
            if state is not _LOCAL:
                # torch, the model and the worker are a few 100k long-lived objects that every full
                # collection in release_memory would walk again (0.1 s a task, measured): freeze them
                # (gc.freeze: they stay alive, later collections skip them). Only in a worker, whose
                # process this package owns.
                gc.collect()
                gc.freeze()
        return state["models"][key], state["loads"][key]


def _libc(name: str) -> Callable[..., int] | None:
    """A glibc function by name, or None (macOS, musl: nothing to tune or trim)."""
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name) if lib else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc("malloc_trim")
_MALLOPT = _libc("mallopt")


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds (MMAP_THRESHOLD, TRIM_THRESHOLD); False where not glibc.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (its
    ``distributed.nanny.pre-spawn-environ``). Any explicit threshold turns glibc's dynamic
    thresholds off, so the mmap threshold stays at 128 KiB: every tensor bigger than that is a
    fresh mmap that is page-faulted in and unmapped again. Measured on an auto-mode DSB image:
    276k minor page faults (about 1 GiB zero-filled) per image in a worker against 17k in a plain
    process, and 1.7x the worker's CPU time on 2 cores (docs/benchmarks.md, issue 14). Freed
    memory still goes back to the system after each task (:func:`release_memory`).
    """
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(_MALLOPT(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``) after a task.

    A task's big temporaries (a 10000-pixel object's mask, the encoder's activations) are freed
    into glibc's heap, which keeps the pages: without this a worker's RSS ratchets up task by
    task to the sum of fragments (measured: +100 MiB over a slide's 25 region tasks).
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_DEPTH = threading.local()


def releases_memory(task: Callable[..., _T]) -> Callable[..., _T]:
    """Decorator: run :func:`release_memory` when the task returns or raises.

    Once per task: a decorated function called by another (``segment_image`` runs
    ``segment_tile`` then ``finish_prompt_free``) leaves the release to the outermost one.
    """

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> _T:
        depth = getattr(_DEPTH, "n", 0)
        _DEPTH.n = depth + 1
        try:
            return task(*args, **kwargs)
        finally:
            _DEPTH.n = depth
            if depth == 0:
                release_memory()

    return run
