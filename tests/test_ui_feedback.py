"""The page answers at once: Interrupt says "Interrupting…" before the running step ends; dropped Train files are
imported without looking for the Import button."""
from __future__ import annotations

import threading

import pytest

from tests.uihelpers import by_id, handlers


@pytest.fixture()
def page(studio):
    from webui.layout import build_blocks
    return build_blocks(studio)


def test_interrupt_shows_at_once_while_the_step_still_runs(page, studio):
    from webui.generation import progress_html
    started, release = threading.Event(), threading.Event()

    def slow_step(ctx):                      # a 28 s step at 768² on a CPU, as long as the test wants
        started.set()
        release.wait(60)
        return None
    job = studio.queue.submit(slow_step, kind="txt2img")
    assert started.wait(30)
    try:
        (fn,) = handlers(page, by_id(page, "txt2img_interrupt"), "click")
        assert fn.outputs == [by_id(page, "txt2img_progress")]
        shown = fn.fn(job.id)
        assert "Interrupting…" in shown and not job.done          # the step has not ended, the page says so
        assert "Interrupting…" in progress_html(job)              # and the polling generator keeps saying it
    finally:
        release.set()
    job.wait(30)
    assert job.state == "interrupted"


def test_interrupt_without_a_job_changes_nothing(page, studio):
    (fn,) = handlers(page, by_id(page, "img2img_interrupt"), "click")
    assert fn.fn(None) == {"__type__": "update"}
