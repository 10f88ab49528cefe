"""Dynamic batching (``queue_batch``) on the demo model: waiting txt2img jobs with other prompts and seeds run as
one batch and each still draws its own prompt, within one grey level of running alone, with its own infotext;
interrupting one keeps its picture as it was at that step and lets the others finish."""
from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from studio import jobs
from tests.effects.effects import request, score

PROMPTS = [("red", "circle", "white"), ("blue", "square", "yellow"), ("green", "triangle", "white"),
           ("yellow", "star", "black")]


@contextlib.contextmanager
def held_queue(studio, queue_batch: int = 8):
    """The queue held by a blocking job while the caller submits, so the jobs wait together; then released."""
    release = threading.Event()
    studio.settings.queue_batch = queue_batch
    blocker = studio.queue.submit(lambda ctx: release.wait(60), kind="test-hold")
    try:
        yield
    finally:
        release.set()
        blocker.wait(60)
        studio.settings.queue_batch = 1


def _requests():
    return [request(f"a {c} {s} on a {b} background", 300 + 7 * k, batch_size=1 + k % 2)
            for k, (c, s, b) in enumerate(PROMPTS)]


def test_waiting_jobs_share_one_batch_and_keep_their_own_pictures(demo_studio):
    alone = [demo_studio.generate(r) for r in _requests()]
    with held_queue(demo_studio):
        group = [demo_studio.submit(r) for r in _requests()]
    together = [j.wait(120) for j in group]
    assert len({j.started for j in group}) == 1, "the jobs did not run as one group"
    for (colour, shape, _), a, t, job in zip(PROMPTS, alone, together, group):
        assert t.seeds == a.seeds and t.infotexts == a.infotexts      # own seeds, prompt, infotext
        for x, y in zip(a.images, t.images):
            # another batch size changes the float rounding only: measured at most 1 grey level
            assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 2
        s = score(t.images[0])
        assert (s.colour, s.shape) == (colour, shape)
        assert job.progress.fraction == 1.0 and job.state == jobs.DONE


def test_interrupting_one_member_keeps_its_step_and_lets_the_others_finish(demo_studio, monkeypatch):
    reqs = _requests()
    alone = demo_studio.generate(reqs[1])
    with held_queue(demo_studio):
        group = [demo_studio.submit(r) for r in reqs]
    victim = group[1]
    original = jobs.JobContext.set_progress

    def set_progress(ctx, step, steps, *a, **k):
        if ctx.job is victim and step == 5 and steps == 20:
            victim.interrupt()               # as a client's interrupt of this task would, at its 5th step
        return original(ctx, step, steps, *a, **k)

    monkeypatch.setattr(jobs.JobContext, "set_progress", set_progress)
    results = [j.wait(120) for j in group]
    assert victim.state == jobs.INTERRUPTED and results[1].interrupted
    assert "Steps: 5," in results[1].infotexts[0] and len(results[1].images) == reqs[1].batch_size
    # its picture is the one of 5 steps: far from the finished one
    assert np.abs(np.asarray(results[1].images[0], np.float32) - np.asarray(alone.images[0], np.float32)).mean() > 5
    for k in (0, 2, 3):
        assert group[k].state == jobs.DONE and "Steps: 20," in results[k].infotexts[0]
        s = score(results[k].images[0])
        assert (s.colour, s.shape) == PROMPTS[k][:2]


@pytest.mark.parametrize("change", [dict(steps=12), dict(width=48), dict(prompt="a red circle <lora:x:1>")])
def test_other_settings_or_loras_run_apart(demo_studio, change):
    from studio.dynamic_batch import batch_key
    base = request("a red circle on a white background", 1)
    assert batch_key(base) == batch_key(base.replace(prompt="a blue star", seed=9, batch_size=3))
    assert batch_key(base) != batch_key(base.replace(**change))
    assert batch_key(base.replace(enable_hr=True)) is None and batch_key(base.replace(mode="img2img")) is None


def test_api_clients_sent_together_are_batched_and_answered_each_their_own(demo_studio, api_client):
    import base64
    import io
    import json

    from PIL import Image

    from studio.demo import TRAINED_NAME
    answers: dict = {}

    def post(k: int, colour: str, shape: str, background: str) -> None:
        body = {"prompt": f"a {colour} {shape} on a {background} background", "seed": 40 + k, "steps": 20,
                "sampler_name": "DPM++ 2M", "scheduler": "Karras", "width": 64, "height": 64,
                "override_settings": {"sd_model_checkpoint": TRAINED_NAME}, "force_task_id": f"batched-{k}"}
        answers[k] = api_client.post("/sdapi/v1/txt2img", json=body)

    with held_queue(demo_studio):
        threads = [threading.Thread(target=post, args=(k, *p)) for k, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for _ in range(600):          # every request is in the queue before it is released
            if len(demo_studio.queue.pending()) >= len(PROMPTS):
                break
            threading.Event().wait(0.05)
    for t in threads:
        t.join(120)
    started = {demo_studio.queue.get(f"batched-{k}").started for k in range(len(PROMPTS))}
    assert len(started) == 1, "the API jobs did not run as one batch"
    for k, (colour, shape, _) in enumerate(PROMPTS):
        assert answers[k].status_code == 200, answers[k].text
        data = answers[k].json()
        info = json.loads(data["info"])
        assert info["seed"] == 40 + k and info["prompt"].startswith(f"a {colour} {shape}")
        image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
        s = score(image)
        assert (s.colour, s.shape) == (colour, shape)
