"""Progress in A1111's shapes, read from the shared job queue, and an async wait for jobs.

A1111 has one global ``shared.state``; here the queue knows every job, so the global route reports the running
job and ``/sdapi/v1/progress/{task_id}`` (or A1111's ``POST /internal/progress``) reports any job by id.
"""
from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from .imagedata import encode_png

if TYPE_CHECKING:  # pragma: no cover
    from ..jobs import Job, JobQueue

QUEUED, RUNNING, DONE = "queued", "running", "done"


class JobWaiter:
    """``await waiter.wait(job)`` without holding a thread: one queue listener wakes the waiting coroutines."""

    def __init__(self, queue: "JobQueue"):
        self._lock = threading.Lock()
        self._waiting: dict[Any, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        queue.add_listener(self._changed)

    def _changed(self, job: "Job") -> None:
        if not job.done:
            return
        with self._lock:
            waiters = self._waiting.pop(job, [])
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut)

    async def wait(self, job: "Job") -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._waiting.setdefault(job, []).append((loop, fut))
        if job.done:  # finished before we registered: the listener may already have run
            with self._lock:
                entries = self._waiting.get(job, [])
                if (loop, fut) in entries:
                    entries.remove((loop, fut))
                if not entries:
                    self._waiting.pop(job, None)
            _resolve(fut)
        await fut


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class JobMeta:
    """What the API knows about the jobs it submitted (batch size, for A1111's job_no / job_count). Bounded."""

    def __init__(self, size: int = 512):
        self._lock = threading.Lock()
        self._data: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._size = size

    def put(self, job_id: str, **meta: Any) -> None:
        with self._lock:
            self._data[job_id] = meta
            self._data.move_to_end(job_id)
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def get(self, job_id: str) -> dict:
        with self._lock:
            return dict(self._data.get(job_id, {}))


class PreviewCache:
    """The last encoded preview, so frequent polls do not re-encode the same image."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._value: str | None = None

    def encode(self, job: "Job") -> tuple[int, str | None]:
        preview_id, image = job.preview_snapshot()
        if image is None:
            return preview_id, None
        key = (job.id, id(job), preview_id)
        with self._lock:
            if key == self._key:
                return preview_id, self._value
        try:
            encoded = encode_png(image)
        except Exception:  # noqa: BLE001 - a preview that is not an image is simply not shown
            encoded = None
        with self._lock:
            self._key, self._value = key, encoded
        return preview_id, encoded


def idle_progress() -> dict:
    return {"progress": 0.0, "eta_relative": 0.0, "state": state_dict(None, {}), "current_image": None,
            "textinfo": None, "current_task": None}


def state_dict(job: "Job | None", meta: dict) -> dict:
    """A1111's shared.state.dict() for ``job``."""
    if job is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    p = job.progress
    batch = max(int(meta.get("batch_size") or 1), 1)
    images = max(p.images, 1)
    started = job.started or job.created
    return {
        "skipped": bool(getattr(job, "_skip", False)),
        "interrupted": bool(getattr(job, "_interrupt", False)),
        "stopping_generation": False,
        "job": job.kind,
        "job_count": max(math.ceil(images / batch), 1),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "job_no": p.image_index // batch,
        "sampling_step": p.step,
        "sampling_steps": p.steps,
    }


def job_progress(job: "Job", meta: dict, previews: PreviewCache, *, skip_current_image: bool) -> dict:
    """ProgressResponse for one job (queued, running or finished)."""
    p = job.progress
    if job.state == QUEUED:
        fraction, eta = 0.0, 0.0
    elif job.state == DONE:
        fraction, eta = 1.0, 0.0
    else:
        fraction, eta = float(p.fraction), float(p.eta_seconds or 0.0)
    image = None
    if not skip_current_image and job.state == RUNNING:
        image = previews.encode(job)[1]
    return {"progress": fraction, "eta_relative": eta, "state": state_dict(job, meta), "current_image": image,
            "textinfo": p.textinfo, "current_task": job.id}


def internal_progress(job: "Job | None", previews: PreviewCache, id_live_preview: int, live_preview: bool) -> dict:
    """A1111's POST /internal/progress answer."""
    if job is None:
        return {"active": False, "queued": False, "completed": False, "progress": None, "eta": None,
                "live_preview": None, "id_live_preview": -1, "textinfo": "Waiting..."}
    if job.state == QUEUED:
        pos = job.queue_position
        return {"active": False, "queued": True, "completed": False, "progress": None, "eta": None,
                "live_preview": None, "id_live_preview": id_live_preview,
                "textinfo": f"In queue: {pos} job(s) ahead" if pos else "In queue..."}
    if job.done:
        return {"active": False, "queued": False, "completed": True, "progress": 1.0, "eta": 0.0,
                "live_preview": None, "id_live_preview": id_live_preview, "textinfo": job.progress.textinfo}
    p = job.progress
    preview, new_id = None, id_live_preview
    if live_preview:
        pid, encoded = previews.encode(job)
        if encoded is not None and pid != id_live_preview:
            preview, new_id = "data:image/png;base64," + encoded, pid
    return {"active": True, "queued": False, "completed": False, "progress": float(p.fraction),
            "eta": p.eta_seconds, "live_preview": preview, "id_live_preview": new_id, "textinfo": p.textinfo}
