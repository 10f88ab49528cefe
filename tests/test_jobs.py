"""The job queue: FIFO order, progress, interrupt / skip, failures, ids, history, listeners, shutdown."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from studio.errors import JobInterrupted
from studio.jobs import JobQueue, Progress

T = 5.0   # generous timeout for waits that normally end in milliseconds


@pytest.fixture
def queue():
    q = JobQueue()
    yield q
    q.shutdown(wait=True, timeout=T)


def blocker(queue, **kw):
    """Submit a job that holds the worker until the returned ``release`` event is set."""
    started, release = threading.Event(), threading.Event()

    def fn(ctx):
        started.set()
        assert release.wait(T)
        return "blocker"

    job = queue.submit(fn, **kw)
    assert started.wait(T)
    return job, release


def test_fifo_order_from_many_threads(queue):
    first, release = blocker(queue)
    ran, jobs, lock = [], [], threading.Lock()

    def submitter(t):
        for i in range(5):
            job = queue.submit(lambda ctx, name=f"{t}-{i}": ran.append(name) or name, description=f"{t}-{i}")
            with lock:
                jobs.append(job)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(T)
    assert len(jobs) == 20 and len(queue.pending()) == 20
    assert [j.queue_position for j in queue.pending()] == list(range(1, 21))
    release.set()
    for job in jobs:
        assert job.wait(T) == job.description
    by_submission = [j.description for j in sorted(jobs, key=lambda j: j.seq)]
    assert ran == by_submission                     # in submission order, each exactly once
    assert len(set(ran)) == 20
    assert first.state == "done" and not queue.busy


def test_progress_and_preview_visible_while_running(queue):
    reported, proceed = threading.Event(), threading.Event()

    def fn(ctx):
        ctx.set_progress(0, 4, image_index=0, images=2, textinfo="warming up")
        time.sleep(0.01)  # some elapsed time so the ETA is positive
        ctx.set_progress(2, 4, image_index=1)
        ctx.set_preview("preview-1")
        reported.set()
        assert proceed.wait(T)
        return "ok"

    job = queue.submit(fn)
    assert reported.wait(T)
    p = job.progress
    assert isinstance(p, Progress)
    assert (p.step, p.steps, p.image_index, p.images) == (2, 4, 1, 2)
    assert p.fraction == pytest.approx(6 / 8)
    assert p.eta_seconds is not None and p.eta_seconds > 0
    assert p.textinfo == "warming up" and p.started_at == job.started
    assert job.preview == "preview-1" and job.preview_id == 1
    assert job.state == "running" and job.queue_position == 0 and queue.current() is job and queue.busy
    proceed.set()
    assert job.wait(T) == "ok"
    assert job.progress.fraction == 1.0 and job.queue_position is None
    assert job.created <= job.started <= job.finished


def test_interrupt_running_job_stops_promptly(queue):
    started = threading.Event()

    def fn(ctx):
        started.set()
        while True:
            ctx.check()
            time.sleep(0.002)

    job = queue.submit(fn)
    assert started.wait(T)
    t0 = time.monotonic()
    assert queue.interrupt() is True
    assert job.wait(T) is None                    # an interrupt is not an error for the caller
    assert time.monotonic() - t0 < 0.5
    assert job.state == "interrupted" and job.error is None and job.done
    assert queue.run_sync(lambda ctx: "next") == "next"


def test_interrupted_job_may_return_partial_result(queue):
    started = threading.Event()

    def fn(ctx):
        started.set()
        images = ["a"]
        while not ctx.interrupted:
            time.sleep(0.002)
        return images

    job = queue.submit(fn)
    assert started.wait(T)
    job.interrupt()
    assert job.wait(T) == ["a"]
    assert job.state == "interrupted"


def test_job_raising_job_interrupted_ends_interrupted(queue):
    def fn(ctx):
        raise JobInterrupted("stopped by itself")

    job = queue.submit(fn)
    assert job.wait(T) is None
    assert job.state == "interrupted" and job.error is None


def test_interrupt_queued_job_never_runs(queue):
    first, release = blocker(queue)
    ran = threading.Event()
    second = queue.submit(lambda ctx: ran.set())
    third = queue.submit(lambda ctx: "third")
    assert (first.queue_position, second.queue_position, third.queue_position) == (0, 1, 2)
    assert queue.interrupt(second.id) is True
    assert second.state == "interrupted" and second.done and second.wait(0) is None
    assert third.queue_position == 1 and queue.pending() == [third]
    release.set()
    assert third.wait(T) == "third"
    assert not ran.is_set()
    assert second.interrupt() is False            # already finished


def test_skip_flag(queue):
    first, release = blocker(queue)
    seen = []
    started, skipped = threading.Event(), threading.Event()

    def fn(ctx):
        seen.append(ctx.skipped)
        started.set()
        assert skipped.wait(T)
        seen.append(ctx.skipped)
        seen.append(ctx.skipped)                  # stays set until cleared
        ctx.clear_skip()
        seen.append(ctx.skipped)
        return ctx.interrupted

    job = queue.submit(fn)
    assert job.skip() is False                    # only a running job can be skipped
    release.set()
    assert started.wait(T)
    assert queue.skip() is True
    skipped.set()
    assert job.wait(T) is False                   # skip does not interrupt the job
    assert seen == [False, True, True, False]
    assert job.state == "done"
    assert queue.skip() is False                  # nothing running any more


def test_failure_is_recorded_and_queue_keeps_working(queue):
    def boom(ctx):
        raise ValueError("boom")

    job = queue.submit(boom)
    with pytest.raises(ValueError, match="boom"):
        job.wait(T)
    assert job.state == "failed" and isinstance(job.error, ValueError)
    assert queue.run_sync(lambda ctx: 42) == 42


def test_wait_timeout(queue):
    first, release = blocker(queue)
    with pytest.raises(TimeoutError):
        first.wait(0.01)
    release.set()
    assert first.wait(T) == "blocker"


def test_task_id_lookup_and_history():
    q = JobQueue(history=2)
    try:
        first, release = blocker(q, task_id="task-1")
        assert first.id == "task-1" and q.get("task-1") is first
        with pytest.raises(ValueError, match="task-1"):
            q.submit(lambda ctx: None, task_id="task-1")
        queued = q.submit(lambda ctx: "q", task_id="task-2", kind="img2img")
        assert q.get("task-2") is queued and queued.kind == "img2img"
        assert len(q.submit(lambda ctx: None).id) == 32      # uuid hex when no task_id is given
        release.set()
        assert queued.wait(T) == "q"
        q.run_sync(lambda ctx: None)
        # history keeps the last 2 finished jobs
        assert q.get("task-1") is None and q.get("task-2") is None
        assert len(q.history()) == 2
        assert q.get("nope") is None
        again = q.submit(lambda ctx: "again", task_id="task-1")   # a finished id may be reused
        assert again.wait(T) == "again" and q.get("task-1") is again
    finally:
        q.shutdown(timeout=T)


def test_listener_exceptions_do_not_break_worker(queue, caplog):
    states = []

    def bad(job):
        raise RuntimeError("listener bug")

    queue.add_listener(bad)
    queue.add_listener(lambda job: states.append((job.id, job.state)))
    gate = threading.Event()   # the job ends only after submit() has notified "queued"
    job = queue.submit(lambda ctx: gate.wait(T) and "fine", task_id="L")
    gate.set()
    assert job.wait(T) == "fine"
    assert ("L", "running") in states and states[-1] == ("L", "done")   # final call precedes wait()
    assert "listener bug" in caplog.text
    queue.remove_listener(bad)
    assert queue.run_sync(lambda ctx: 1) == 1


def test_run_sync_inside_a_job_refuses(queue):
    def nested(ctx):
        return queue.run_sync(lambda c: None)

    with pytest.raises(RuntimeError, match="inside a job"):
        queue.run_sync(nested)


def test_shutdown_cancels_pending_and_stops_worker():
    q = JobQueue()
    first, release = blocker(q)
    queued = q.submit(lambda ctx: "never")
    q.shutdown(wait=False)
    assert queued.state == "interrupted"
    with pytest.raises(RuntimeError, match="shut down"):
        q.submit(lambda ctx: None)
    release.set()
    q.shutdown(wait=True, timeout=T)
    assert first.state == "done" and not q._thread.is_alive()


def test_shutdown_can_drain_pending():
    q = JobQueue()
    first, release = blocker(q)
    queued = q.submit(lambda ctx: "drained")
    release.set()
    q.shutdown(wait=True, cancel_pending=False, timeout=T)
    assert queued.result == "drained" and queued.state == "done"


def test_jobs_module_does_not_import_torch():
    code = "import sys, studio.jobs; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
