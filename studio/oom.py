"""Out of device memory: free what the cache holds, retry the job once, and never keep a failed job's tensors alive.

An exception's traceback references every frame it passed through, and each frame its locals: after an OOM deep in
a UNet forward those are the activations that filled the card. A stored error (the job queue keeps the last
jobs) would pin them until restart, so errors are kept without frames or chained exceptions.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, TypeVar

from .errors import StudioError
from .lazy import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

FIX = "lower the size or batch size (or the hires upscale), or start with --medvram (--lowvram on small cards)"


class OutOfMemory(StudioError):
    """The device ran out of memory."""

    def __init__(self, message: str, *, fix: str = FIX):
        super().__init__(message, fix=fix)


def is_oom(exc: BaseException) -> bool:
    """A device (or host) allocation failure, as torch raises it on CUDA, MPS and the CPU."""
    if isinstance(exc, OutOfMemory):
        return True
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # MPS and the CPU allocator raise a plain RuntimeError
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                              or "can't allocate memory" in str(exc).lower())


def drop_frames(exc: BaseException) -> BaseException:
    """``exc`` without its traceback and chained exceptions, their frames' locals cleared (returns ``exc``).

    ``traceback.clear_frames`` is the library way to release finished frames' locals; frames still executing
    (the caller's) are skipped by it.
    """
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
        e.__traceback__ = None
        e.__cause__ = None
        e.__context__ = None
    return exc


def message(request: Any) -> str:
    """What a job that ran out of memory twice was asking for (the fix is added by :class:`OutOfMemory`)."""
    size = f"{request.width}x{request.height}"
    if getattr(request, "enable_hr", False):
        w, h = request.hr_size
        size += f" (hires {w}x{h})"
    return f"Out of device memory at {size}, batch size {request.batch_size}, even after freeing every cached model."


def retry_once(run: Callable[[], T], free: Callable[[], None], request: Any) -> T:
    """``run()``; on an out-of-memory error drop its frames, ``free()`` memory and run once more.

    A second OOM raises :class:`OutOfMemory` naming the fix.
    """
    for attempt in (1, 2):
        try:
            return run()
        except BaseException as exc:  # noqa: BLE001 - only OOMs are handled, everything else is re-raised
            if not is_oom(exc):
                raise
            drop_frames(exc)
            what = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        # outside the except block: the exception (and its frames) are gone before memory is freed or we raise
        if attempt == 2:
            raise OutOfMemory(message(request))
        log.warning("Out of memory (%s); freeing cached models and retrying once.", what)
        free()
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
