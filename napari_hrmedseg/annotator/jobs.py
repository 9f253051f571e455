"""A small job queue over napari thread workers: one job at a time, in the order submitted.

The predictor is not shared between threads, so every model call (loading, segmenting, saving,
downloading) goes through one ``JobQueue``: a job submitted while another runs waits for it.
Results and callbacks arrive on the UI thread (napari's workers emit through Qt signals).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from psygnal import Signal


# The worker's nice value. It used to be 10, which under load lost every contest for the CPU
# (43 sample boxes took 522 s in the annotator against 39 s in the CLI on the same machine);
# bench/bench_ui.py measures both settings. The UI stays responsive without it: Linux favours
# the waking UI thread, and the worker leaves a core's worth of torch threads free.
WORKER_NICENESS = 0


def prepare_worker_thread(niceness: int | None = None) -> None:
    """Set up the calling (worker) thread for model work without starving it or the UI.

    torch's thread pool is capped at ``cores - 1`` so that, with no other load, the UI thread has
    a core the model's own threads do not contend for; a ``niceness`` above 0 (default
    :data:`WORKER_NICENESS`) lowers the thread's priority (Linux; no effect where unsupported).
    """
    import os

    import torch

    cores = os.cpu_count() or 1
    if torch.get_num_threads() > max(1, cores - 1):
        torch.set_num_threads(max(1, cores - 1))
    niceness = WORKER_NICENESS if niceness is None else niceness
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except (AttributeError, OSError):  # not Linux, or not permitted
        pass


@dataclass
class _Job:
    """A submitted job: its (not yet started) worker and what to call around it."""

    worker: Any
    on_result: Callable[[Any], None] | None
    what: str
    cancel: threading.Event | None
    on_done: Callable[[], None] | None


class JobQueue:
    """Runs jobs one after another in napari thread workers.

    Signals (psygnal, emitted on the UI thread): ``busy(bool, str)`` when the queue starts work
    (with what it does) and when it has nothing left; ``idle()`` each time a job ends and no
    submitted job is waiting (the annotator then queues its next object); ``error(object)`` with
    the exception a job raised.
    """

    busy = Signal(bool, str)
    idle = Signal()
    error = Signal(object)

    def __init__(self) -> None:
        self._worker: Any = None
        self._cancel: threading.Event | None = None
        self._waiting: deque[_Job] = deque()

    @property
    def is_busy(self) -> bool:
        """True while a job runs."""
        return self._worker is not None

    @property
    def waiting(self) -> int:
        """Jobs submitted and not started yet."""
        return len(self._waiting)

    def submit(
        self,
        fn: Callable[[], Any],
        on_result: Callable[[Any], None] | None = None,
        what: str = "",
        *,
        on_done: Callable[[], None] | None = None,
        on_yield: Callable[[Any], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Any:
        """Queue ``fn`` (a function, or a generator function whose items go to ``on_yield``).

        Args:
            fn: the work, run in a worker thread.
            on_result: called with what ``fn`` returned (not after an error).
            what: what the job does, for the ``busy`` signal ("segmenting object 3").
            on_done: called when the job ends, whether it succeeded, failed or was cancelled.
            on_yield: called with each item a generator ``fn`` yields.
            cancel: an event ``fn`` watches; ``cancel()`` sets it while this job runs.

        Returns:
            The napari worker (started now, or when the jobs before it have ended).
        """
        from napari.qt.threading import create_worker

        worker = create_worker(fn, _start_thread=False)
        if on_yield is not None:
            worker.yielded.connect(on_yield)
        job = _Job(worker, on_result, what, cancel, on_done)
        if self._worker is not None:
            self._waiting.append(job)
        else:
            self._start(job)
        return worker

    def cancel(self) -> None:
        """Stop the running job and set every waiting job's cancel event.

        A cancellable job (one submitted with ``cancel``) that waits stops at its first check;
        waiting jobs without an event (saving, loading) still run: cancelling never loses a commit.
        """
        for job in self._waiting:
            if job.cancel is not None:
                job.cancel.set()
        if self._cancel is not None:
            self._cancel.set()
        if self._worker is not None and hasattr(self._worker, "quit"):
            self._worker.quit()

    def _start(self, job: _Job) -> None:
        worker = job.worker
        self._worker, self._cancel = worker, job.cancel
        if job.on_result is not None:
            worker.returned.connect(job.on_result)
        worker.errored.connect(self.error.emit)

        def finished() -> None:
            self._worker = self._cancel = None
            if job.on_done is not None:
                job.on_done()
            if self._waiting:
                self._start(self._waiting.popleft())
            else:
                self.idle.emit()
            if self._worker is None:
                self.busy.emit(False, "")

        worker.finished.connect(finished)
        self.busy.emit(True, job.what)
        worker.start()
