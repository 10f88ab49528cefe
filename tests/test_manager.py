"""Pipeline manager, registry and queue behaviour: caching, eviction, interrupt, and every bad input."""
from __future__ import annotations

import os
import pickle
import threading
import time

import numpy as np
import pytest

from studio.errors import StudioError
from studio.request import GenerationRequest

TINY = dict(width=64, height=64, steps=2, prompt="a cube", save_images=False)


def req(**kw) -> GenerationRequest:
    return GenerationRequest(**{**TINY, **kw})


def count_reads(monkeypatch):
    """Count every checkpoint file read by the loaders."""
    from studio.loading import single_file, state_dict

    reads = []
    original = state_dict.read_state_dict

    def spy(path, *a, **k):
        reads.append(os.fspath(path))
        return original(path, *a, **k)

    monkeypatch.setattr(state_dict, "read_state_dict", spy)
    monkeypatch.setattr(single_file, "read_state_dict", spy, raising=False)
    return reads


def test_switching_back_reads_no_file(studio, monkeypatch):
    reads = count_reads(monkeypatch)
    studio.switch_checkpoint("tiny-sd1.safetensors")
    studio.switch_checkpoint("tiny-sd1-b.safetensors")
    assert len(reads) == 2
    loads = studio.manager.loads
    studio.switch_checkpoint("tiny-sd1.safetensors")
    studio.generate(req(seed=1))
    assert len(reads) == 2 and studio.manager.loads == loads


def test_views_share_modules(studio):
    from studio.samplers import make_scheduler

    with studio.manager.acquire("tiny-sd1.safetensors") as loaded:
        s1, _ = make_scheduler("Euler", "Automatic", loaded.components.scheduler_config)
        p1 = studio.manager.pipeline(loaded, "txt2img", s1)
        p2 = studio.manager.pipeline(loaded, "txt2img", s1)
        assert p1.unet is p2.unet is loaded.components.unet
        assert p1.text_encoder is loaded.components.text_encoder


def test_lru_eviction_under_budget(settings):
    from studio.app import Studio

    probe = Studio(settings)
    probe.switch_checkpoint("tiny-sd1.safetensors")
    size = probe.manager.stats()["entries"][0]["bytes"]
    probe.close()
    budget_mb = (2 * size + size // 2) // 2**20 + 1
    s = Studio(settings.replace(ram_budget_mb=budget_mb, vram_budget_mb=budget_mb))
    try:
        for name in ("tiny-sd1.safetensors", "tiny-sd1-b.safetensors", "tiny-sd1-c.safetensors"):
            s.switch_checkpoint(name)
        labels = [e["label"] for e in s.manager.stats()["entries"]]
        assert labels == ["tiny-sd1-b.safetensors", "sub/tiny-sd1-c.safetensors"]
        loads = s.manager.loads
        s.switch_checkpoint("tiny-sd1.safetensors")  # evicted: must be read again
        assert s.manager.loads == loads + 1
    finally:
        s.close()


def test_running_job_model_is_never_evicted(settings):
    from studio.app import Studio

    s = Studio(settings.replace(ram_budget_mb=1, vram_budget_mb=1))
    try:
        with s.manager.acquire("tiny-sd1.safetensors") as held:
            s.manager.load("tiny-sd1-b.safetensors")  # over budget, but the held model is locked
            assert any(e["label"] == "tiny-sd1.safetensors" for e in s.manager.stats()["entries"])
            assert held.components.unet is not None
    finally:
        s.close()


def test_interrupt_stops_within_a_step_and_keeps_images(studio):
    job = studio.submit(req(steps=40, n_iter=3, seed=1, sampler_name="Euler"))
    deadline = time.time() + 60
    while job.progress.step < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert job.preview is not None
    job.interrupt()
    result = job.wait(60)
    assert job.state == "interrupted"
    assert result.interrupted and len(result.images) == 1  # the batch in flight is kept, later ones never start


def test_skip_moves_to_next_batch(studio):
    job = studio.submit(req(steps=30, n_iter=2, seed=1, sampler_name="Euler"))
    while job.progress.step < 2:
        time.sleep(0.01)
    job.skip()
    result = job.wait(60)
    assert len(result.images) == 2 and not result.interrupted


def test_concurrent_submissions_all_complete_in_order(studio):
    jobs, lock = [], threading.Lock()

    def client(i):
        j = studio.submit(req(seed=i))
        with lock:
            jobs.append(j)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    results = [j.wait(120) for j in jobs]
    assert all(len(r.images) == 1 for r in results)
    started = sorted(jobs, key=lambda j: j.started)
    assert [j.created for j in started] == sorted(j.created for j in jobs)


# ---- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("width", 65, "multiple of 8"), ("height", 100, "multiple of 8"), ("steps", 0, "between 1"),
    ("steps", -3, "between 1"), ("batch_size", 0, "between 1"), ("cfg_scale", "high", "number"),
])
def test_bad_fields_are_named(studio, field, value, needle):
    with pytest.raises(StudioError) as err:
        studio.generate(req(**{field: value}))
    assert err.value.field == field and needle in str(err.value)


def test_unknown_sampler_is_named(studio):
    with pytest.raises(StudioError) as err:
        studio.generate(req(sampler_name="Warp Drive"))
    assert err.value.field == "sampler_name" and "Euler a" in str(err.value)


def assert_still_usable(studio, name="tiny-sd1.safetensors"):
    res = studio.generate(req(seed=1, checkpoint=name))
    assert len(res.images) == 1


def test_missing_checkpoint_lists_titles(studio):
    with pytest.raises(StudioError) as err:
        studio.generate(req(checkpoint="nope.safetensors"))
    assert "tiny-sd1.safetensors" in str(err.value) and err.value.field == "checkpoint"


def test_path_in_checkpoint_name_refused(studio):
    with pytest.raises(StudioError) as err:
        studio.generate(req(checkpoint="../../etc/passwd"))
    assert "path" in str(err.value)


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "unknown-arch"])
def test_broken_files_named_and_previous_model_kept(studio, models_dir, kind):
    studio.switch_checkpoint("tiny-sd1.safetensors")
    ckpt = models_dir / "Stable-diffusion"
    bad = ckpt / f"bad-{kind}.safetensors"
    if kind == "truncated":
        data = (ckpt / "tiny-sd1-b.safetensors").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "garbage":
        bad.write_bytes(os.urandom(5000))
    else:
        from safetensors.torch import save_file
        import torch
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(bad))
    studio.registry.refresh()
    with pytest.raises(StudioError) as err:
        studio.generate(req(checkpoint=bad.name))
    assert bad.name in str(err.value)
    assert studio.manager.current.name == "tiny-sd1.safetensors"
    assert_still_usable(studio)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/studio-evil-marker",))


def test_code_executing_pickle_refused(studio, models_dir):
    marker = "/tmp/studio-evil-marker"
    if os.path.exists(marker):
        os.remove(marker)
    bad = models_dir / "Stable-diffusion" / "evil.ckpt"
    with open(bad, "wb") as fh:
        pickle.dump({"state_dict": _Evil()}, fh)
    studio.registry.refresh()
    with pytest.raises(StudioError) as err:
        studio.generate(req(checkpoint="evil.ckpt"))
    assert "evil.ckpt" in str(err.value)
    assert not os.path.exists(marker)
    assert_still_usable(studio)


def test_vanished_checkpoint(studio, models_dir):
    studio.registry.refresh()
    (models_dir / "Stable-diffusion" / "tiny-sd1-b.safetensors").unlink()
    with pytest.raises(StudioError) as err:
        studio.generate(req(checkpoint="tiny-sd1-b.safetensors"))
    assert "no longer on disk" in str(err.value) or "not found" in str(err.value)
    assert_still_usable(studio)


def test_inpainting_checkpoint_recognised(settings, models_dir):
    from tests import tinymodels
    from studio.app import Studio

    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=9, in_channels=9),
                                 models_dir / "Stable-diffusion" / "tiny-inpainting.safetensors")
    s = Studio(settings)
    try:
        with s.manager.acquire("tiny-inpainting.safetensors") as loaded:
            assert loaded.components.is_inpaint
        # like A1111, an inpainting model also draws from text (through a full mask)
        assert s.generate(req(checkpoint="tiny-inpainting.safetensors")).images[0].size == (64, 64)
    finally:
        s.close()


def test_v_prediction_sidecar_and_setting(settings, models_dir):
    from studio.app import Studio

    ckpt = models_dir / "Stable-diffusion"
    (ckpt / "tiny-sd2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    s = Studio(settings)
    try:
        with s.manager.acquire("tiny-sd2.safetensors") as loaded:
            assert loaded.components.prediction_type == "v_prediction"
            assert loaded.components.scheduler_config["prediction_type"] == "v_prediction"
        assert len(s.generate(req(checkpoint="tiny-sd2.safetensors")).images) == 1
    finally:
        s.close()
    s = Studio(settings.replace(model_overrides={"tiny-sd1.safetensors": {"prediction": "v"}}))
    try:
        with s.manager.acquire("tiny-sd1.safetensors") as loaded:
            assert loaded.components.prediction_type == "v_prediction"
    finally:
        s.close()


def test_no_checkpoint_message(tmp_path):
    from studio.app import Studio
    from studio.settings import Settings

    s = Studio(Settings(models_dir=str(tmp_path / "empty"), data_dir=str(tmp_path / "d"), outdir=str(tmp_path / "o")))
    try:
        with pytest.raises(StudioError) as err:
            s.generate(req())
        assert "--demo" in str(err.value)
    finally:
        s.close()


def test_registry_titles_and_hash_lookup(studio, models_dir):
    import hashlib

    info = studio.registry.find_checkpoint("tiny-sd1")
    sha = studio.registry.ensure_hash(info)
    assert sha == hashlib.sha256((models_dir / "Stable-diffusion" / "tiny-sd1.safetensors").read_bytes()).hexdigest()
    assert info.title == f"tiny-sd1.safetensors [{sha[:10]}]"
    assert studio.registry.find_checkpoint(info.title) is info
    assert studio.registry.find_checkpoint(sha[:10]) is info
    assert studio.registry.find_checkpoint("sub/tiny-sd1-c.safetensors").name == "sub/tiny-sd1-c.safetensors"


def test_hub_repo_offline_message(studio, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StudioError) as err:
        studio.generate(req(checkpoint="someone/some-model"))
    assert "someone/some-model" in str(err.value)
    assert_still_usable(studio)
