"""The one FIFO queue in front of the device: per-job id, progress, live preview, interrupt and skip.

Every caller (UI, REST API, extensions, training start) submits a function here; a single worker thread runs
them one at a time in submission order. Pure threading, no torch, so it is cheap to import anywhere.

A1111 semantics: *interrupt* ends the whole job, *skip* ends only the current image / batch (the job function
polls ``ctx.skipped`` and calls ``ctx.clear_skip()`` when it has moved on).

Dynamic batching: a job submitted with a :class:`Batchable` runs together with the compatible jobs (same key)
waiting right behind it, as one call of its ``run``; each job still has its own context, progress, result and
interrupt.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from .errors import JobInterrupted, StudioError
from .oom import drop_frames

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, INTERRUPTED = "queued", "running", "done", "failed", "interrupted"
FINAL_STATES = frozenset({DONE, FAILED, INTERRUPTED})


@dataclass(frozen=True)
class Progress:
    """An immutable snapshot; the job swaps in a new one on each update, so readers never see a torn state.

    ``step`` counts finished steps of the current image (0..steps); ``fraction`` covers the whole job
    (images × steps) and ``eta_seconds`` extrapolates from the time spent so far (None until there is progress).
    """

    step: int = 0
    steps: int = 0
    image_index: int = 0
    images: int = 1
    fraction: float = 0.0
    eta_seconds: float | None = None
    started_at: float | None = None
    textinfo: str | None = None
    batch: int = 1          # images made together from image_index on (the steps count for all of them)


@dataclass(frozen=True)
class Batchable:
    """How a job may share one run with compatible waiting jobs.

    ``run([(item, ctx), ...])`` returns one outcome per job, in order: its result, or the exception it ended with.
    ``size`` is what the job adds to a group (its images); a group holds at most the queue's limit.
    """

    key: Hashable
    item: Any
    run: Callable[[list], list]
    size: int = 1


class Job:
    """One unit of work in the queue. Created by :meth:`JobQueue.submit`; read it from any thread."""

    def __init__(self, queue: JobQueue, fn: Callable[[JobContext], Any], *, job_id: str, kind: str,
                 description: str, seq: int, batch: Batchable | None = None, transparent: bool = False):
        self.id = job_id
        self.kind = kind
        self.description = description
        self.seq = seq                      # submission order, unique per queue
        self.state = QUEUED
        self.progress = Progress()
        self.result: Any = None
        self.error: BaseException | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self._fn: Callable[[JobContext], Any] | None = fn
        self._batch = batch
        self._transparent = transparent   # a group may gather compatible jobs from behind it
        self._queue = queue
        self._preview: tuple[int, Any] = (0, None)   # (id, object) swapped as one so the pair stays consistent
        self._interrupt = False
        self._skip = False
        self._done = threading.Event()

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.kind} {self.state}>"

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def preview(self) -> Any:
        """The latest live preview (typically a PIL image), or None."""
        return self._preview[1]

    @property
    def preview_id(self) -> int:
        """Counts previews set so far; a client re-fetches only when it changes."""
        return self._preview[0]

    def preview_snapshot(self) -> tuple[int, Any]:
        """``(preview_id, preview)`` read atomically."""
        return self._preview

    @property
    def queue_position(self) -> int | None:
        """0 while running, 1 for the next job to run, and so on; None once finished."""
        return self._queue._position(self)

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the job ends and return its result; re-raises the job's exception.

        An interrupted job returns whatever partial result it produced (often None). Raises TimeoutError.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"Job {self.id} is still {self.state} after {timeout} s.")
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def interrupt_requested(self) -> bool:
        """True once ``interrupt()`` was asked for (a running job stops at its next check, e.g. a step's end)."""
        return self._interrupt

    def interrupt(self) -> bool:
        """Stop the job: a running one at its next check, a queued one is cancelled without running."""
        return self._queue._interrupt(self)

    def skip(self) -> bool:
        """Ask a running job to end its current image / batch. False (no-op) unless the job is running."""
        return self._queue._skip(self)


class JobContext:
    """What a job function gets: report progress and previews, poll interrupt / skip."""

    def __init__(self, job: Job):
        self._job = job

    @property
    def job_id(self) -> str:
        return self._job.id

    @property
    def job(self) -> Job:
        return self._job

    @property
    def interrupted(self) -> bool:
        return self._job._interrupt

    @property
    def skipped(self) -> bool:
        """True after ``skip()`` until ``clear_skip()``: the function decides where the current image ends."""
        return self._job._skip

    def clear_skip(self) -> None:
        self._job._skip = False

    def check(self) -> None:
        """Raise :class:`JobInterrupted` if the job was interrupted (call it between steps)."""
        if self._job._interrupt:
            raise JobInterrupted(f"Job {self._job.id} was interrupted.")

    def set_progress(self, step: int, steps: int, image_index: int | None = None, images: int | None = None,
                     textinfo: str | None = None, batch: int | None = None) -> Progress:
        """Publish progress; ``image_index`` / ``images`` / ``textinfo`` / ``batch`` keep their last values when None.

        ``batch`` images from ``image_index`` on are made together, so each step advances all of them.
        """
        job = self._job
        last = job.progress
        image_index = last.image_index if image_index is None else image_index
        images = last.images if images is None else images
        textinfo = last.textinfo if textinfo is None else textinfo
        batch = last.batch if batch is None else max(int(batch), 1)
        total = max(images, 1) * steps
        fraction = min(max((image_index * steps + step * batch) / total, 0.0), 1.0) if total > 0 else 0.0
        started = job.started or time.time()
        eta = None
        if fraction > 0:
            elapsed = time.time() - started
            eta = elapsed * (1.0 - fraction) / fraction
        job.progress = Progress(step=step, steps=steps, image_index=image_index, images=images,
                                fraction=fraction, eta_seconds=eta, started_at=started, textinfo=textinfo,
                                batch=batch)
        return job.progress

    def set_preview(self, obj: Any) -> None:
        """Publish a live preview (any object; the UI expects a PIL image)."""
        self._job._preview = (self._job._preview[0] + 1, obj)


class JobQueue:
    """A FIFO of jobs run by one daemon worker thread; keeps the last ``history`` finished jobs for lookup.

    ``batch_limit()`` (read before each group) is the most a group of batchable jobs may hold, by their sizes;
    1 runs every job alone.
    """

    def __init__(self, history: int = 200, batch_limit: Callable[[], int] | None = None):
        self._cond = threading.Condition()     # guards everything below and every job's state transitions
        self._pending: collections.deque[Job] = collections.deque()
        self._active: dict[str, Job] = {}      # queued + running, by id
        self._history: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._history_size = max(int(history), 0)
        self._current: Job | None = None
        self._running: list[Job] = []           # the running job, or the jobs of the running group
        self._batch_limit = batch_limit or (lambda: 1)
        self._listeners: list[Callable[[Job], Any]] = []
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="studio-jobs", daemon=True)
        self._thread.start()

    # -- submitting -------------------------------------------------------------------------------------------
    def submit(self, fn: Callable[[JobContext], Any], *, kind: str = "txt2img", task_id: str | None = None,
               description: str = "", batch: Batchable | None = None, transparent: bool = False) -> Job:
        """Queue ``fn(ctx)``. ``task_id`` (e.g. the client's id) becomes the job id; it must not be active.

        With ``batch``, the job may run in one group with the compatible jobs waiting behind it (``fn`` is then
        what it runs alone). A ``transparent`` job changes nothing such a group depends on, so a group may take
        compatible jobs from behind it (they then run before it).
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("The job queue is shut down; no new jobs are accepted.")
            job_id = task_id or uuid.uuid4().hex
            if job_id in self._active:
                raise ValueError(f"A job with task_id {job_id!r} is already queued or running.")
            job = Job(self, fn, job_id=job_id, kind=kind, description=description, seq=next(self._seq),
                      batch=batch, transparent=transparent)
            self._active[job_id] = job
            self._pending.append(job)
            self._cond.notify()
        self._notify(job)
        return job

    def run_sync(self, fn: Callable[[JobContext], Any], *, timeout: float | None = None, **kw: Any) -> Any:
        """Submit and wait for the result (re-raises the job's exception)."""
        if threading.current_thread() is self._thread:
            # the worker would wait for a job queued behind itself forever
            raise RuntimeError("run_sync() called from inside a job; call the function directly instead.")
        return self.submit(fn, **kw).wait(timeout)

    # -- looking -----------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        with self._cond:
            return self._current is not None or bool(self._pending)

    def current(self) -> Job | None:
        """The running job (the first of a running group)."""
        return self._current

    def running(self) -> list[Job]:
        """Every running job: one, or the members of a group."""
        with self._cond:
            return list(self._running)

    def get(self, job_id: str) -> Job | None:
        """A running, queued or recently finished job by id."""
        with self._cond:
            return self._active.get(job_id) or self._history.get(job_id)

    def pending(self) -> list[Job]:
        """Queued jobs in the order they will run (the running job excluded)."""
        with self._cond:
            return list(self._pending)

    def history(self) -> list[Job]:
        """Recently finished jobs, oldest first."""
        with self._cond:
            return list(self._history.values())

    # -- controlling -------------------------------------------------------------------------------------------
    def interrupt(self, job_id: str | None = None) -> bool:
        """Interrupt what is running (every job of a group: A1111's Interrupt stops the generation), or the job
        ``job_id`` alone (a queued one is cancelled). False if none."""
        jobs = self.running() if job_id is None else [j for j in [self.get(job_id)] if j is not None]
        return any([job.interrupt() for job in jobs])

    def skip(self, job_id: str | None = None) -> bool:
        """Skip the current image of what is running (or of running job ``job_id``)."""
        jobs = self.running() if job_id is None else [j for j in [self.get(job_id)] if j is not None]
        return any([job.skip() for job in jobs])

    def add_listener(self, callback: Callable[[Job], Any]) -> Callable[[Job], Any]:
        """Call ``callback(job)`` after each state change (from the thread that made it; read ``job.state``).

        A job's final notification happens before ``wait()`` returns. Exceptions are logged and ignored.
        """
        with self._cond:
            self._listeners.append(callback)
        return callback

    def remove_listener(self, callback: Callable[[Job], Any]) -> None:
        with self._cond:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = True, timeout: float | None = None) -> None:
        """Accept no more jobs; cancel queued ones (or let them run with ``cancel_pending=False``).

        The running job is left to finish; interrupt it first for a fast stop.
        """
        cancelled = []
        with self._cond:
            self._closed = True
            while cancel_pending and self._pending:
                job = self._pending.popleft()
                job._interrupt = True
                self._finish(job, INTERRUPTED)
                cancelled.append(job)
            self._cond.notify_all()
        for job in cancelled:
            self._announce(job)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- internals ---------------------------------------------------------------------------------------------
    def _position(self, job: Job) -> int | None:
        with self._cond:
            if job.state == RUNNING:
                return 0
            if job.state == QUEUED:
                return self._pending.index(job) + 1
            return None

    def _interrupt(self, job: Job) -> bool:
        with self._cond:
            if job.done:
                return False
            job._interrupt = True
            cancel = job.state == QUEUED
            if cancel:
                self._pending.remove(job)
                self._finish(job, INTERRUPTED)
        if cancel:
            self._announce(job)
        return True

    def _skip(self, job: Job) -> bool:
        with self._cond:
            if job.state != RUNNING:
                return False
            job._skip = True
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return      # closed and drained
                group = self._take_group()
                now = time.time()
                for job in group:
                    job.state = RUNNING
                    job.started = now
                    job.progress = Progress(started_at=now)
                self._current, self._running = group[0], list(group)
            for job in group:
                self._notify(job)
            if len(group) == 1:
                self._execute(group[0])
            else:
                self._execute_group(group)

    def _take_group(self) -> list[Job]:
        """The head job and the compatible jobs waiting behind it (up to the limit); call with the lock held."""
        head = self._pending.popleft()
        spec = head._batch
        if spec is None:
            return [head]
        limit = max(int(self._batch_limit()), 1)
        group, size = [head], spec.size
        for job in list(self._pending):
            other = job._batch
            if other is not None and other.key == spec.key:
                if size + other.size > limit:
                    break
                group.append(job)
                size += other.size
                self._pending.remove(job)
            elif not job._transparent:
                break   # a job that may change what the group depends on (a model switch, settings) ends it
        return group

    def _execute(self, job: Job) -> None:
        result, error, interrupted = None, None, False
        try:
            result = job._fn(JobContext(job))
        except BaseException as exc:  # noqa: BLE001 - the worker must outlive anything a job does
            result, error, interrupted = self._failure(job, exc)
        self._settle(job, result, error, interrupted)

    def _execute_group(self, group: list[Job]) -> None:
        contexts = [JobContext(job) for job in group]
        try:
            outcomes = group[0]._batch.run([(job._batch.item, ctx) for job, ctx in zip(group, contexts)])
            if len(outcomes) != len(group):
                raise RuntimeError(f"A batched run returned {len(outcomes)} outcomes for {len(group)} jobs.")
        except BaseException as exc:  # noqa: BLE001 - every member ends with the group's error
            outcomes = [exc] * len(group)
        for job, outcome in zip(group, outcomes):
            if isinstance(outcome, BaseException):
                self._settle(job, *self._failure(job, outcome))
            else:
                self._settle(job, outcome, None, False)

    @staticmethod
    def _failure(job: Job, exc: BaseException) -> tuple[Any, BaseException | None, bool]:
        """(result, error, interrupted) of a job that raised ``exc``."""
        if isinstance(exc, JobInterrupted):
            return getattr(exc, "result", None), None, True   # a job may attach partial results to the exception
        if isinstance(exc, StudioError):  # bad input, already explained to the caller: one line is enough
            log.warning("Job %s (%s): %s", job.id, job.kind, exc)
        else:
            log.error("Job %s (%s) failed: %s", job.id, job.kind, exc, exc_info=exc)
        # kept in the history for wait() and the API: without its frames, whose locals (pipelines, latents,
        # an OOM's activations) would otherwise stay alive as long as the job is listed
        return None, drop_frames(exc), False

    def _settle(self, job: Job, result: Any, error: BaseException | None, interrupted: bool) -> None:
        with self._cond:
            if error is not None:
                state = FAILED
            elif interrupted or job._interrupt:
                state = INTERRUPTED
            else:
                state = DONE
            self._finish(job, state, result, error)
            if job in self._running:
                self._running.remove(job)
            if not self._running:
                self._current = None
            elif self._current is job:
                self._current = self._running[0]
        self._announce(job)

    def _finish(self, job: Job, state: str, result: Any = None, error: BaseException | None = None) -> None:
        """Record the end of a job; call with the lock held, then ``_announce`` without it."""
        job.state, job.result, job.error = state, result, error
        job.finished = time.time()
        job._fn = None     # drop the closure: it may hold pipelines or big tensors
        if state == DONE:
            p = job.progress
            job.progress = Progress(step=p.steps, steps=p.steps, image_index=max(p.images - p.batch, 0),
                                    images=p.images, fraction=1.0, eta_seconds=0.0, started_at=p.started_at,
                                    textinfo=p.textinfo, batch=p.batch)
        self._active.pop(job.id, None)
        if self._history_size:
            self._history.pop(job.id, None)
            self._history[job.id] = job
            while len(self._history) > self._history_size:
                self._history.popitem(last=False)

    def _announce(self, job: Job) -> None:
        # listeners first, so a caller returning from wait() knows they have seen the final state
        self._notify(job)
        job._done.set()

    def _notify(self, job: Job) -> None:
        with self._cond:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback(job)
            except Exception:  # noqa: BLE001 - a listener must never break the worker
                log.exception("Job listener %r failed for job %s", callback, job.id)
