"""Out of device memory: the job is retried once after freeing cached models, and a failed job pins no tensors.

A CUDA OOM is simulated on the CPU: torch.cuda.OutOfMemoryError can be raised without a GPU, here by a patched
UNet forward.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio.request import GenerationRequest

TINY = dict(width=64, height=64, steps=2, prompt="a cube", save_images=False)


def req(**kw) -> GenerationRequest:
    return GenerationRequest(**{**TINY, **kw})


def labels(studio) -> list[str]:
    return [e["label"] for e in studio.manager.stats()["entries"]]


def patch_unet(studio, forward_factory):
    unet = studio.manager.current_components().unet
    original = unet.forward
    unet.forward = forward_factory(original)
    return unet


def test_oom_frees_cached_models_and_retries_once(studio, monkeypatch):
    from diffusers import UNet2DConditionModel

    studio.switch_checkpoint("tiny-sd1-b.safetensors")
    expected = np.asarray(studio.generate(req(seed=7)).images[0])
    studio.switch_checkpoint("tiny-sd1.safetensors")   # cached and unlocked once the job runs on -b: to evict
    calls, seen_at_retry = [], []
    original = UNet2DConditionModel.forward

    def forward(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if not seen_at_retry:
            seen_at_retry.append(labels(studio))
        return original(self, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    result = studio.generate(req(seed=7, checkpoint="tiny-sd1-b.safetensors"))
    assert len(calls) > 1, "the job was not retried"
    assert seen_at_retry and "tiny-sd1.safetensors" not in seen_at_retry[0], "nothing was evicted before the retry"
    assert "tiny-sd1-b.safetensors" in seen_at_retry[0], "the job's own checkpoint is kept"
    assert np.array_equal(np.asarray(result.images[0]), expected)  # the retry makes the same image


def test_second_oom_fails_clearly_and_pins_no_activations(studio):
    studio.switch_checkpoint("tiny-sd1.safetensors")
    refs = []

    def factory(original):
        def forward(*a, **k):
            activations = torch.ones(256, 256)  # stands for what filled the card
            refs.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward

    unet = patch_unet(studio, factory)
    try:
        job = studio.submit(req(seed=1))
        with pytest.raises(StudioError) as info:
            job.wait(120)
    finally:
        del unet.forward
    assert len(refs) == 2, "one retry, then the error"
    assert "Out of device memory at 64x64, batch size 1" in str(info.value) and "--medvram" in str(info.value)
    stored = studio.queue.get(job.id).error
    assert stored.__cause__ is None and stored.__context__ is None
    del info
    gc.collect()
    assert [r() for r in refs] == [None, None], "a failed job keeps the tensors of its failing frames alive"
    # the studio goes on: the next job runs with the model still loaded
    loads = studio.manager.loads
    assert studio.generate(req(seed=1)).images and studio.manager.loads == loads


def test_a_failed_job_keeps_no_frames(tmp_path):
    from studio.jobs import JobQueue

    queue = JobQueue()
    refs = []

    def job(ctx):
        big = torch.ones(128, 128)
        refs.append(weakref.ref(big))
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError("a bug in a job") from exc

    try:
        failed = queue.submit(job)
        with pytest.raises(ValueError):
            failed.wait(30)
        gc.collect()
        assert refs[0]() is None
        assert queue.get(failed.id).error.__cause__ is None
    finally:
        queue.shutdown()


def test_free_device_memory_parks_unlocked_models_in_ram(studio, monkeypatch):
    """Two tiers (a GPU): unlocked models move to the RAM tier, the kept and the locked ones stay."""
    from studio.manager import PipelineManager

    monkeypatch.setattr(PipelineManager, "single_tier", property(lambda self: False))
    m = studio.manager
    m.load("tiny-sd1-b.safetensors")
    m.load("tiny-sd1-c")
    keep = m.load("tiny-sd1.safetensors")
    with m.acquire("tiny-sd1-c"):
        freed = m.free_device_memory(keep=keep)
        tiers = {e["label"]: e["tier"] for e in m.stats()["entries"]}
    assert tiers == {"tiny-sd1-b.safetensors": "cpu", "sub/tiny-sd1-c.safetensors": "device",
                     "tiny-sd1.safetensors": "device"}
    assert freed == m.stats()["entries"][0]["bytes"]


def test_oom_is_recognised():
    from studio import oom

    assert oom.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert oom.is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert oom.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: can't allocate memory"))
    assert not oom.is_oom(RuntimeError("Input type (c10::Half) and bias type (float) should be the same"))
    assert not oom.is_oom(ValueError("out of memory"))
