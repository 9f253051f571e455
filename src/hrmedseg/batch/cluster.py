"""Where a batch runs: an embedded Dask cluster on this machine, or an existing one.

- CPU: a ``LocalCluster`` of worker processes listening on 127.0.0.1 only, one task at a time per
  worker, torch threads = cores / workers (so workers do not oversubscribe the cores).
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
    return max(1, machine_cores() // max(1, workers))


def _worker_env(threads: int) -> dict[str, str]:
    # Fewer glibc malloc arenas for torch's threads: lower peak RSS (docs/benchmarks.md, issue 3).
    return {"OMP_NUM_THREADS": str(threads), "MALLOC_ARENA_MAX": "2"}


def local_cluster(workers: int | None = None, gpus: list[int] | None = None) -> tuple[Any, int]:
    """``(cluster, torch threads per worker)``: an embedded cluster bound to 127.0.0.1."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    if gpus:
        threads = torch_threads_per_worker(len(gpus))
        worker_specs = {
            f"gpu{g}": {"cls": Nanny, "options": {"nthreads": 1, "host": LOCALHOST, "env": {
                "CUDA_VISIBLE_DEVICES": str(g), **_worker_env(threads)}}}
            for g in gpus
        }
        scheduler = {"cls": Scheduler, "options": {"host": LOCALHOST, "dashboard_address": f"{LOCALHOST}:0"}}
        return SpecCluster(workers=worker_specs, scheduler=scheduler, silence_logs=40), threads
    n = workers or max(1, machine_cores() // 2)
    if n < 1:
        raise InputError(f"--workers {n}: give at least 1")
    threads = torch_threads_per_worker(n)
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, host=LOCALHOST, dashboard_address=f"{LOCALHOST}:0",
        env=_worker_env(threads), silence_logs=40,
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
