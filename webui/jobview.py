"""Following a non-generation job (merges) from a Gradio generator: progress bar HTML, errors naming the field."""
from __future__ import annotations

import html
import logging
from typing import Any, Callable, Iterator

from studio.errors import StudioError
from webui.common import error_html

log = logging.getLogger(__name__)

POLL_SECONDS = 0.3


def progress_html(job: Any) -> str:
    """The same bar as generation (``.studio-progress``), with the job's own text (tensor i/n · key)."""
    p = job.progress
    if getattr(job, "interrupt_requested", False) and not job.done:
        text, pct = "Interrupting… (the current tensor finishes first)", int(p.fraction * 100) if p.steps else 0
    elif job.state == "queued":
        text, pct = f"Waiting in the queue (position {job.queue_position})…", 0
    else:
        pct = int(p.fraction * 100) if p.steps else 0
        text = (p.textinfo or "Starting…") + (f" · {pct}%" if p.steps else "")
        if p.eta_seconds and p.steps:
            text += f" · ETA {p.eta_seconds:.0f} s"
    return (f"<div class='studio-progress' data-state='{job.state}'><div class='studio-progress-bar' "
            f"style='width:{pct}%'></div><span class='studio-progress-text'>{html.escape(text)}</span></div>")


def failure_html(exc: BaseException, label: Callable[[str | None], str]) -> str:
    """A StudioError says which field is at fault (by its label in the UI); anything else is a bug."""
    if isinstance(exc, StudioError):
        prefix = f"{label(exc.field)}: " if exc.field else ""
        return error_html(prefix + str(exc))
    return error_html(f"Merge failed: {type(exc).__name__}: {exc}")


def follow(submit: Callable[[], Any]) -> Iterator[tuple[str, Any, BaseException | None, Any]]:
    """Submit a job and yield ``(progress html, outcome, error, job)`` every POLL_SECONDS until it ends.

    The last item has an empty progress and either the outcome or the error (outcome None and no error: the job
    was interrupted)."""
    try:
        job = submit()
    except StudioError as exc:
        yield "", None, exc, None
        return
    while True:
        try:
            outcome = job.wait(POLL_SECONDS)
        except TimeoutError:
            yield progress_html(job), None, None, job
            continue
        except Exception as exc:  # noqa: BLE001 - shown on the page; the queue already logged a real failure
            yield "", None, exc, job
            return
        yield "", outcome, None, job
        return
