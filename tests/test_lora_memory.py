"""LoRA memory bookkeeping: the patched-set cache is a setting, originals live only while patched, and both are
counted in the PipelineManager's RAM tier (issue 15, item 11). The tiny SD1's full kohya set touches 2.8 MB,
so MB settings play the part the 512 MB rule played against a 1.25 GB SD1.5 set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.adapters import AdapterPatcher, held_bytes, load_lora_file, patch_cache_bytes, patcher_for
from studio.request import GenerationRequest
from studio.settings import Settings
from tests import lorafiles as lf
from tests.tinymodels import make_tiny

BASE = dict(width=64, height=64, steps=2, seed=5, save_images=False, sampler_name="Euler", prompt="a cube")


@pytest.fixture(scope="module")
def sd1():
    return make_tiny("sd1", seed=0)


@pytest.fixture()
def loras(tmp_path, sd1):
    """Two kohya LoRAs over every layer and one over the UNet only (overlapping layer sets)."""
    return [load_lora_file(lf.write(tmp_path / f"l{i}.safetensors", lf.kohya_lora(sd1, seed=i, te=i < 2)[0]))
            for i in range(3)]


def _state(c):
    return {f"{a}.{k}": v.detach().clone() for a, m in c.modules().items() for k, v in m.state_dict().items()}


def _same(c, snap) -> bool:
    return all(torch.equal(v, _state(c)[k]) for k, v in snap.items())


def _touched_bytes(p: AdapterPatcher) -> int:
    return sum(getattr(m, a).numel() * getattr(m, a).element_size() for m, a, _ in p._originals.values())


def test_cache_size_is_a_setting_with_a_default_from_the_ram_budget():
    assert patch_cache_bytes(Settings(lora_patch_cache_mb=3)) == 3 << 20
    assert patch_cache_bytes(Settings(lora_patch_cache_mb=0)) == 0
    assert Settings().lora_patch_cache_mb == -1
    assert patch_cache_bytes(Settings(ram_budget_mb=4000)) == 1000 << 20
    settings = Settings(lora_patch_cache_mb=7)
    c = make_tiny("sd1", seed=0)
    assert patcher_for(c, settings).cache_bytes == 7 << 20
    settings.lora_patch_cache_mb = 2  # the Settings tab changes the live object
    assert patcher_for(c).cache_bytes == 7 << 20 and patcher_for(c, settings).cache_bytes == 2 << 20


@pytest.mark.parametrize("mb, hit", [(2, False), (4, True), (0, False)])
def test_set_above_the_cache_recomputes_and_a_big_enough_setting_hits(sd1, loras, mb, hit):
    p = AdapterPatcher(sd1, cache_bytes=patch_cache_bytes(Settings(lora_patch_cache_mb=mb)))
    try:
        p.apply([(loras[0], 1.0, 1.0)])
        assert (p.cached_bytes > 0) == hit and p.cached_bytes <= mb << 20
        patched = _state(sd1)
        p.apply([])
        p.apply([(loras[0], 1.0, 1.0)])  # re-activation
        assert p.patch_count == (1 if hit else 2)
        assert _same(sd1, patched)
    finally:
        p.release()


def test_default_setting_holds_a_set_the_old_fixed_rule_dropped(sd1, loras):
    """Scaled down: the set is 2.8 MB; a 16 MB RAM budget gives a 4 MB cache by default (0.5 MB held nothing)."""
    p = patcher_for(make_tiny("sd1", seed=0), Settings(ram_budget_mb=16))
    p.apply([(loras[0], 1.0, 1.0)])
    p.apply([])
    p.apply([(loras[0], 1.0, 1.0)])
    assert p.patch_count == 1


def test_lowering_the_setting_trims_the_cache_at_the_next_apply(sd1, loras):
    settings = Settings(lora_patch_cache_mb=16)
    c = make_tiny("sd1", seed=0)
    patcher_for(c, settings).apply([(loras[0], 1.0, 1.0)])
    patcher_for(c, settings).apply([(loras[1], 1.0, 1.0)])
    assert patcher_for(c).cached_bytes > 4 << 20
    settings.lora_patch_cache_mb = 0
    patcher_for(c, settings).apply([(loras[1], 1.0, 1.0)])  # unchanged set: still trims
    assert patcher_for(c).cached_bytes == 0


def test_originals_are_held_only_while_patched(sd1, loras):
    snap = _state(sd1)
    p = AdapterPatcher(sd1, cache_bytes=0)
    p.apply([(loras[0], 1.0, 1.0)])
    assert p.originals_bytes == _touched_bytes(p) > 2 << 20 and p.nbytes == p.originals_bytes
    p.apply([(loras[2], 1.0, 1.0)])  # UNet only: the text encoder's originals go
    assert p.originals_bytes == _touched_bytes(p)
    unet = {id(m) for m in sd1.unet.modules()}
    assert p._originals and all(id(m) in unet for m, _, _ in p._originals.values())
    p.apply([])
    assert p.originals_bytes == 0 and not p._originals and _same(sd1, snap)
    p.apply([(loras[1], 0.5, 1.0)])
    p.restore()
    assert p.nbytes == 0 and _same(sd1, snap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_restore_stays_bit_exact_across_overlapping_switches(tmp_path, dtype):
    c = make_tiny("sd1", seed=0)
    c.unet.to(dtype), c.text_encoder.to(dtype)
    files = [load_lora_file(lf.write(tmp_path / f"l{i}.safetensors", lf.kohya_lora(c, seed=i, te=i < 2)[0]))
             for i in range(3)]
    snap = _state(c)
    p = AdapterPatcher(c, cache_bytes=16 << 20)
    sets = [[(files[0], 1.0, 1.0)], [(files[2], 0.0, 1.3)], [(files[0], 1.0, 1.0), (files[1], -0.7, 0.4)],
            [(files[1], 1.0, 0.0)], [(files[0], 1.0, 1.0)], [(files[2], 0.0, 1.3)]]
    first = {}
    for i, s in enumerate(sets):
        p.apply(s)
        key = p.key
        if key in first:
            assert _same(c, first[key]), f"set {i} differs from its first application"
        else:
            first[key] = _state(c)
    assert p.patch_count < len(sets)  # some came from the cache
    p.apply([])
    assert _same(c, snap) and p.originals_bytes == 0


def test_patch_bytes_are_in_the_manager_stats_and_budget(settings, models_dir, sd1):
    from studio.app import Studio

    lf.write(models_dir / "Lora" / "style.safetensors", lf.kohya_lora(sd1, seed=0)[0], lf.metadata_for(sd1))
    studio = Studio(settings.replace(lora_patch_cache_mb=8))
    try:
        plain = studio.generate(GenerationRequest(**BASE))
        mgr = studio.manager
        models = sum(e["bytes"] for e in mgr.stats()["entries"])
        assert mgr.stats()["extras"] == [] and mgr.used("device") == models
        styled = studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube <lora:style:1>"}))
        patcher = patcher_for(mgr.current_components())
        extras = mgr.stats()["extras"]
        assert extras == [{"label": "LoRA patches of tiny-sd1.safetensors", "bytes": patcher.nbytes}]
        assert patcher.originals_bytes > 2 << 20 and patcher.cached_bytes > 2 << 20
        assert mgr.used("device") == models + patcher.nbytes  # the CPU's single tier is RAM
        again = studio.generate(GenerationRequest(**BASE))
        assert patcher.originals_bytes == 0 and mgr.stats()["extras"][0]["bytes"] == patcher.cached_bytes
        assert np.array_equal(np.asarray(plain.images[0]), np.asarray(again.images[0]))
        restyled = studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube <lora:style:1>"}))
        assert patcher.patch_count == 1  # re-activation came from the cache
        assert np.array_equal(np.asarray(styled.images[0]), np.asarray(restyled.images[0]))
        assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(styled.images[0]))
        assert held_bytes(mgr.current_components()) == patcher.nbytes
        mgr.unload_all()
        assert mgr.stats()["extras"] == []  # the patcher went with its model
    finally:
        studio.close()


def test_patch_bytes_make_the_manager_evict_another_model(settings, models_dir, sd1):
    """A budget for two tiny checkpoints and 2 MB: once the LoRA bytes count, a second checkpoint evicts the first."""
    from studio.app import Studio

    lf.write(models_dir / "Lora" / "style.safetensors", lf.kohya_lora(sd1, seed=0)[0], lf.metadata_for(sd1))
    probe = Studio(settings)
    probe.manager.load("tiny-sd1.safetensors")
    size = probe.manager.stats()["entries"][0]["bytes"]
    probe.close()
    mb = ((2 * size) >> 20) + 2
    studio = Studio(settings.replace(ram_budget_mb=mb, vram_budget_mb=mb, lora_patch_cache_mb=8))
    try:
        studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube <lora:style:1>"}))
        # one model + 5.6 MB of originals and cached set: a second model no longer fits beside them
        assert studio.manager.used("device") + size > mb << 20 >= 2 * size
        studio.generate(GenerationRequest(**{**BASE, "checkpoint": "tiny-sd1-b.safetensors"}))
        labels = [e["label"] for e in studio.manager.stats()["entries"]]
        assert labels == ["tiny-sd1-b.safetensors"], labels
    finally:
        studio.close()
