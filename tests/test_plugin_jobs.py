"""The annotator's job queue: one job at a time, in the order submitted; cancel; errors."""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def jobs(qtbot):
    from napari_hrmedseg.annotator.jobs import JobQueue

    queue = JobQueue()
    yield queue
    queue.cancel()
    qtbot.waitUntil(lambda: not queue.is_busy and queue.waiting == 0, timeout=30_000)


def test_jobs_run_one_at_a_time_in_submission_order(jobs, qtbot):
    lock = threading.Lock()
    running, overlap, started, results, done, busy = [0], [0], [], [], [], []
    jobs.busy.connect(lambda flag, what: busy.append((flag, what)))
    idle = []
    jobs.idle.connect(lambda: idle.append(True))

    def job(name):
        def work():
            with lock:
                running[0] += 1
                overlap[0] = max(overlap[0], running[0])
                started.append(name)
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return name

        return work

    for name in "abc":
        jobs.submit(job(name), results.append, f"job {name}", on_done=lambda name=name: done.append(name))
    assert jobs.is_busy and jobs.waiting == 2
    qtbot.waitUntil(lambda: len(done) == 3 and not jobs.is_busy, timeout=30_000)
    assert started == results == done == ["a", "b", "c"]
    assert overlap[0] == 1, "two jobs ran at the same time"
    assert busy == [(True, "job a"), (True, "job b"), (True, "job c"), (False, "")]
    assert idle == [True]  # once, when nothing was left waiting


def test_cancel_stops_the_running_job_and_cancellable_waiting_ones(jobs, qtbot):
    first_items, second_items, results, done = [], [], [], []
    first_cancel, second_cancel = threading.Event(), threading.Event()

    def counting(cancel):
        def work():
            for i in range(1000):
                yield i
                if cancel.is_set():
                    return
                time.sleep(0.01)

        return work

    jobs.submit(counting(first_cancel), None, "first", on_yield=first_items.append, cancel=first_cancel,
                on_done=lambda: done.append("first"))
    jobs.submit(counting(second_cancel), None, "second", on_yield=second_items.append, cancel=second_cancel,
                on_done=lambda: done.append("second"))
    jobs.submit(lambda: "saved", results.append, "saving", on_done=lambda: done.append("saving"))
    qtbot.waitUntil(lambda: len(first_items) >= 3, timeout=30_000)
    jobs.cancel()
    qtbot.waitUntil(lambda: len(done) == 3 and not jobs.is_busy, timeout=30_000)
    assert done == ["first", "second", "saving"]
    assert 3 <= len(first_items) < 1000 and first_cancel.is_set()
    assert second_cancel.is_set() and len(second_items) <= 1  # stopped at its first check
    assert results == ["saved"]  # a job without a cancel event still runs: a commit is never lost


def test_an_error_is_reported_and_the_next_job_runs(jobs, qtbot):
    errors, results = [], []
    jobs.error.connect(errors.append)

    def fail():
        raise ValueError("broken")

    # napari's workers also re-raise a job's error in the Qt event loop (napari shows it)
    with qtbot.capture_exceptions() as raised:
        jobs.submit(fail, results.append, "failing")
        jobs.submit(lambda: "next", results.append, "next")
        qtbot.waitUntil(lambda: results == ["next"] and not jobs.is_busy, timeout=30_000)
    assert len(errors) == 1 and isinstance(errors[0], ValueError) and str(errors[0]) == "broken"
    assert [type(e[1]) for e in raised] == [ValueError]
