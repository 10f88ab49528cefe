"""Dynamic batching in the job queue: compatible waiting jobs run as one group, each with its own outcome."""
from __future__ import annotations

import threading

import pytest

from studio.errors import JobInterrupted, StudioError
from studio.jobs import DONE, FAILED, INTERRUPTED, Batchable, JobQueue
from tests.test_jobs import T, blocker


@pytest.fixture
def limit():
    return {"n": 8}


@pytest.fixture
def queue(limit):
    q = JobQueue(batch_limit=lambda: limit["n"])
    yield q
    q.shutdown(wait=True, timeout=T)


def grouped(queue, key, item, calls, size=1, outcome=None):
    """A batchable job: alone it returns ('alone', item); in a group the group records its items."""
    def run(items):
        calls.append([i for i, _ in items])
        return [outcome(i, ctx) if outcome else ("group", i) for i, ctx in items]
    return queue.submit(lambda ctx: ("alone", item), batch=Batchable(key, item, run, size=size))


def test_waiting_jobs_with_one_key_run_as_one_group(queue):
    first, release = blocker(queue)
    calls: list = []
    jobs = [grouped(queue, "k", i, calls) for i in range(4)]
    release.set()
    assert [j.wait(T) for j in jobs] == [("group", i) for i in range(4)]
    assert calls == [[0, 1, 2, 3]]
    assert len({j.started for j in jobs}) == 1 and all(j.state == DONE for j in jobs)


def test_a_lone_batchable_job_runs_its_own_function(queue):
    calls: list = []
    assert grouped(queue, "k", 7, calls).wait(T) == ("alone", 7)
    assert calls == []


def test_groups_end_at_another_key_a_barrier_and_the_limit(queue, limit):
    limit["n"] = 3
    first, release = blocker(queue)
    calls: list = []
    a = [grouped(queue, "a", i, calls) for i in range(2)]
    b = grouped(queue, "b", 10, calls)                  # another key ends the group of "a" ...
    a2 = [grouped(queue, "a", i, calls) for i in range(2, 4)]
    switch = queue.submit(lambda ctx: "switch")          # ... and so does a job that is not transparent
    a3 = [grouped(queue, "a", i, calls, size=2) for i in range(4, 7)]   # limit 3 images: one size-2 job each
    release.set()
    for j in a + [b] + a2 + [switch] + a3:
        j.wait(T)
    assert calls == [[0, 1], [2, 3]]
    assert b.result == ("alone", 10) and [j.result for j in a3] == [("alone", i) for i in range(4, 7)]


def test_a_group_takes_jobs_from_behind_a_transparent_job(queue):
    first, release = blocker(queue)
    calls: list = []
    order: list = []
    one = grouped(queue, "k", 1, calls)
    restore = queue.submit(lambda ctx: order.append("restore"), transparent=True)
    two = grouped(queue, "k", 2, calls)
    release.set()
    two.wait(T), restore.wait(T)
    assert calls == [[1, 2]] and one.result == ("group", 1) and restore.state == DONE


def test_each_member_keeps_its_own_failure_or_interrupt(queue):
    first, release = blocker(queue)
    calls: list = []

    def outcome(item, ctx):
        if item == 1:
            return StudioError("bad prompt", field="prompt")
        if item == 2:
            exc = JobInterrupted("stopped")
            exc.result = "partial"
            return exc
        return ("group", item)

    jobs = [grouped(queue, "k", i, calls, outcome=outcome) for i in range(3)]
    release.set()
    for j in jobs:
        j._done.wait(T)
    assert [j.state for j in jobs] == [DONE, FAILED, INTERRUPTED]
    assert jobs[2].result == "partial" and str(jobs[1].error) == "bad prompt"


def running_group(queue, n, answer):
    """``n`` batchable jobs running as one group, held inside it until the returned event is set; the group
    answers ``answer(item, ctx)`` for each."""
    first, release = blocker(queue)
    inside, go = threading.Event(), threading.Event()

    def run(items):
        inside.set()
        assert go.wait(T)
        return [answer(i, ctx) for i, ctx in items]

    jobs = [queue.submit(lambda ctx: None, batch=Batchable("k", i, run)) for i in range(n)]
    release.set()
    assert inside.wait(T)
    return jobs, go


def test_interrupting_one_member_leaves_the_others_running(queue):
    jobs, go = running_group(queue, 3, lambda i, ctx: ("interrupted" if ctx.interrupted else "done", i))
    assert [j.queue_position for j in jobs] == [0, 0, 0]
    assert queue.current() is jobs[0] and queue.running() == jobs
    jobs[1].interrupt()
    go.set()
    assert [j.wait(T) for j in jobs] == [("done", 0), ("interrupted", 1), ("done", 2)]
    assert [j.state for j in jobs] == [DONE, INTERRUPTED, DONE]
    assert queue.current() is None and queue.running() == []


def test_interrupt_without_an_id_stops_the_whole_group(queue):
    jobs, go = running_group(queue, 2, lambda i, ctx: ctx.interrupted)
    assert queue.interrupt()              # A1111's POST /sdapi/v1/interrupt: the generation, every member
    go.set()
    assert [j.wait(T) for j in jobs] == [True, True]


def test_a_group_that_raises_fails_every_member(queue):
    first, release = blocker(queue)

    def run(items):
        raise RuntimeError("device lost")

    jobs = [queue.submit(lambda ctx: None, batch=Batchable("k", i, run)) for i in range(2)]
    release.set()
    for j in jobs:
        with pytest.raises(RuntimeError, match="device lost"):
            j.wait(T)


def test_batch_progress_counts_every_image_of_the_batch(queue):
    def fn(ctx):
        p = ctx.set_progress(10, 20, image_index=0, images=4, batch=4)
        return p.fraction

    assert queue.submit(fn).wait(T) == 0.5     # half the steps of the only batch: half the job
