"""Where a batch runs: an embedded Dask cluster on this machine, or an existing one.

- CPU: a ``LocalCluster`` of worker processes listening on 127.0.0.1 only, one task at a time per
  worker, torch threads = cores // workers, at least 1 (so workers do not oversubscribe the
  cores), set in each worker before it takes a task (:class:`~hrmedseg.batch.WorkerSetup`).
- GPUs: one worker process per GPU, each pinned to its device with ``CUDA_VISIBLE_DEVICES``.
- ``--scheduler tcp://HOST:PORT`` (or ``tls://``; default ``DASK_SCHEDULER_ADDRESS``): a cluster
  started with ``dask scheduler`` / ``dask worker`` (or dask-jobqueue), with Dask's TLS
  :class:`distributed.security.Security` from flags or from Dask's configuration.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import InputError

LOCALHOST = "127.0.0.1"


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_ids(spec: str) -> list[int]:
    """GPU indices for ``--gpus all|N``; an error on a machine without (enough) CUDA GPUs."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise InputError(f"--gpus {spec}: this machine has no CUDA GPU (torch sees none); leave --gpus out to run on CPU workers")
    if spec == "all":
        return list(range(count))
    try:
        n = int(spec)
    except ValueError:
        raise InputError(f"--gpus {spec!r}: give 'all' or a number of GPUs") from None
    if not 1 <= n <= count:
        raise InputError(f"--gpus {n}: this machine has {count} GPU(s)")
    return list(range(n))


def torch_threads_per_worker(workers: int) -> int:
    """torch threads for each of ``workers`` processes on this machine: cores // workers, at least 1."""
    return max(1, machine_cores() // max(1, workers))


def _worker_env(threads: int) -> dict[str, str]:
    """Set in each worker process as it starts, before it imports torch (Nanny ``env``)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# Dask's nanny sets distributed.nanny.pre-spawn-environ in its own process's environment before it
# starts a worker, so it lands in the worker and in this process. Its defaults are wrong here:
# MALLOC_TRIM_THRESHOLD_=65536 turns off glibc's dynamic mmap threshold (a fresh mmap, page
# faults and all, for every tensor over 128 KiB: see worker_cache.tune_malloc), and
# OMP/MKL/OPENBLAS_NUM_THREADS=1 would be left in this process (its torch, its later subprocesses)
# and, being already set, would win over the next cluster's sizing. None: not set. The thread
# counts come from _worker_env instead. MALLOC_ARENA_MAX must be set before the process starts
# to take effect (glibc reads it at start-up): fewer arenas, lower peak RSS (issue 3).
PRE_SPAWN_ENVIRON: dict[str, str | None] = {
    "MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None, "OPENBLAS_NUM_THREADS": None,
    "MALLOC_ARENA_MAX": "2",
}


def local_cluster(workers: int | None = None, gpus: list[int] | None = None) -> tuple[Any, int]:
    """``(cluster, torch threads per worker)``: an embedded cluster bound to 127.0.0.1.

    Every worker (and any the nanny restarts) runs :class:`~hrmedseg.batch.WorkerSetup` before it
    registers with the scheduler, so its torch thread count is set before any task runs.
    """
    import dask
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    from .worker_cache import WorkerSetup

    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: give at least 1")
    n = len(gpus) if gpus else workers or max(1, machine_cores() // 2)
    threads = torch_threads_per_worker(n)
    plugins = (WorkerSetup(threads),)
    # The nanny reads pre-spawn-environ when it is made (here) and keeps it for restarts.
    with dask.config.set({"distributed.nanny.pre-spawn-environ": PRE_SPAWN_ENVIRON}):
        if gpus:
            worker_specs = {
                f"gpu{g}": {"cls": Nanny, "options": {"nthreads": 1, "host": LOCALHOST, "plugins": plugins, "env": {
                    "CUDA_VISIBLE_DEVICES": str(g), **_worker_env(threads)}}}
                for g in gpus
            }
            scheduler = {"cls": Scheduler, "options": {"host": LOCALHOST, "dashboard_address": f"{LOCALHOST}:0"}}
            return SpecCluster(workers=worker_specs, scheduler=scheduler, silence_logs=40), threads
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, host=LOCALHOST, dashboard_address=f"{LOCALHOST}:0",
            env=_worker_env(threads), plugins=plugins, silence_logs=40,
        )
    return cluster, threads


def security_from(ca_file: str | None = None, cert: str | None = None, key: str | None = None, address: str | None = None):
    """Dask TLS settings: from the flags when given, else Dask's configuration (``distributed.comm.tls``)."""
    from distributed.security import Security

    given = [v for v in (ca_file, cert, key) if v]
    for path in given:
        if not os.path.isfile(path):
            raise InputError(f"TLS file not found: {path}")
    if given:
        if not (ca_file and cert):
            raise InputError("TLS needs --tls-ca-file and --tls-cert (and --tls-key unless the key is in the cert file)")
        return Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key, require_encryption=True)
    security = Security()  # reads Dask's config: DASK_DISTRIBUTED__COMM__TLS__* or ~/.config/dask/*.yaml
    if address and address.startswith("tls://") and not security.tls_ca_file:
        raise InputError(f"--scheduler {address} uses TLS: give --tls-ca-file/--tls-cert/--tls-key or set them in Dask's config")
    return security


def connect(scheduler: str, security: Any):
    """A client of the cluster at ``scheduler``; a clear error when it cannot be reached."""
    from distributed import Client

    try:
        return Client(scheduler, security=security, timeout="20s")
    except (OSError, TimeoutError) as err:
        raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from err
