"""Switching between an SDXL and a FLUX.1 checkpoint: both stay cached within the budget, an fp8 file is counted by
what it really holds (before and after loading), and past the budget the least recently used model goes first."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from tests.families.test_flux_generation import px
from tests.tinyflux import flux_state_dict

MiB = 1024**2
SDXL, FLUX, FP8 = "tiny-sdxl.safetensors", "flux1-dev-tiny.safetensors", "flux1-dev-tiny-fp8.safetensors"


@pytest.fixture()
def mixed_models(models_dir, flux_store):
    """The SD models plus the FLUX.1 dev file and an fp8 (e4m3fn) copy of its transformer, as Comfy-Org ships."""
    from safetensors.torch import load_file, save_file

    ckpt = models_dir / "Stable-diffusion"
    shutil.copy(flux_store / "Stable-diffusion" / FLUX, ckpt / FLUX)
    sd = load_file(str(ckpt / FLUX))
    save_file({k: (v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and v.ndim == 2 else v)
               .contiguous() for k, v in sd.items()}, str(ckpt / FP8))
    return models_dir


def _studio(settings, **kw):
    from studio.app import Studio
    return Studio(settings.replace(**kw))


def _req(checkpoint: str, **kw):
    from studio.request import GenerationRequest
    return GenerationRequest(prompt="a red cube", checkpoint=checkpoint, steps=2, width=64, height=64, seed=7,
                             **kw)


def _sizes(settings) -> dict[str, int]:
    """Bytes each model holds once loaded, measured with room for all."""
    s = _studio(settings, default_checkpoint=SDXL)
    try:
        for name in (SDXL, FLUX, FP8):
            s.manager.load(name)
        return {e["label"]: e["bytes"] for e in s.manager.stats()["entries"]}
    finally:
        s.close()


def test_sdxl_and_flux_stay_cached_within_the_budget(settings, mixed_models):
    sizes = _sizes(settings)
    budget_mb = math.ceil((sizes[FLUX] + sizes[FP8]) / MiB) + 1        # room for any two, not for three
    assert sizes[SDXL] + sizes[FLUX] + sizes[FP8] > budget_mb * MiB
    s = _studio(settings, default_checkpoint=SDXL, ram_budget_mb=budget_mb, vram_budget_mb=budget_mb)
    try:
        first = {name: s.generate(_req(name)) for name in (SDXL, FLUX)}
        again = {name: s.generate(_req(name)) for name in (SDXL, FLUX)}
        stats = s.manager.stats()
        assert s.manager.loads == 2, "switching back re-read a checkpoint that should have stayed cached"
        assert sorted(e["label"] for e in stats["entries"]) == sorted([SDXL, FLUX])
        assert stats["ram_used"] <= stats["ram_budget"] == budget_mb * MiB
        for name in (SDXL, FLUX):     # the cached model draws what it drew before the switch
            assert (px(first[name].images[0]) == px(again[name].images[0])).all(), name
        assert (px(first[SDXL].images[0]) != px(first[FLUX].images[0])).any()

        # past the budget the least recently used model makes room for the fp8 file: FLUX, once SDXL drew again
        s.generate(_req(SDXL))
        s.generate(_req(FP8))
        assert sorted(e["label"] for e in s.manager.stats()["entries"]) == sorted([SDXL, FP8])
        assert s.manager.stats()["ram_used"] <= budget_mb * MiB
    finally:
        s.close()


def test_fp8_file_is_counted_by_what_it_holds(settings, mixed_models):
    """The header estimate the manager makes room with, and the count after loading, are the fp8 sizes."""
    s = _studio(settings, default_checkpoint=FLUX)
    try:
        estimates = {n: s.manager._estimate(s.registry.find_checkpoint(n)) for n in (FLUX, FP8)}
        for name in (FLUX, FP8):
            s.manager.load(name)
        held = {e["label"]: e["bytes"] for e in s.manager.stats()["entries"]}
        with s.manager.acquire(FP8, "Automatic") as loaded:
            unet = loaded.components.unet
            fp8 = sum(p.numel() for p in unet.parameters() if p.dtype == torch.float8_e4m3fn)
            assert fp8 > 0.5 * sum(p.numel() for p in unet.parameters())
    finally:
        s.close()
    for name in (FLUX, FP8):
        assert abs(estimates[name] - held[name]) <= 0.02 * held[name], (name, estimates[name], held[name])
    # every fp8 weight saves (float size - 1) bytes against the full-precision file
    saved = fp8 * (torch.empty((), dtype=s.manager.dtype).element_size() - 1)
    assert abs((held[FLUX] - held[FP8]) - saved) <= 0.01 * held[FLUX], (held, saved)
