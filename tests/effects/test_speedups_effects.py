"""Speed settings on the demo model (studio/speedups.py): channels_last, the SDPA backend, torch.compile and VAE
tiling keep the picture within float rounding, stay on the cached module between jobs and are undone when off."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from studio.demo import TRAINED_NAME
from tests.effects.effects import request, score

PROMPT = "a green triangle on a white background"


@contextlib.contextmanager
def setting(studio, **values):
    old = {k: getattr(studio.settings, k) for k in values}
    for k, v in values.items():
        setattr(studio.settings, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(studio.settings, k, v)


def _unet(studio):
    with studio.manager.acquire(TRAINED_NAME, "Automatic") as loaded:
        return loaded.components.unet, loaded.vae


def _diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def test_channels_last_keeps_the_picture_and_is_undone(demo_studio):
    plain = demo_studio.generate(request(PROMPT, 11)).images[0]
    with setting(demo_studio, channels_last=True):
        fast = demo_studio.generate(request(PROMPT, 11)).images[0]
        unet, _ = _unet(demo_studio)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert not unet.conv_in.weight.is_contiguous()
    assert _diff(plain, fast) <= 2 and (score(fast).colour, score(fast).shape) == ("green", "triangle")
    demo_studio.generate(request(PROMPT, 11))
    assert unet.conv_in.weight.is_contiguous()


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_an_sdpa_backend_keeps_the_picture(demo_studio, backend):
    plain = demo_studio.generate(request(PROMPT, 12)).images[0]
    with setting(demo_studio, sdpa_backend=backend):
        result = demo_studio.generate(request(PROMPT, 12))
    assert _diff(plain, result.images[0]) <= 2 and not result.warnings


def test_a_cuda_only_sdpa_backend_on_the_cpu_says_so(demo_studio):
    with setting(demo_studio, sdpa_backend="efficient"):
        result = demo_studio.generate(request(PROMPT, 13))
    assert any("'efficient' is a CUDA kernel" in w for w in result.warnings)


def test_compile_caches_one_graph_per_size_and_is_undone(demo_studio):
    from torch._dynamo.utils import counters
    plain = demo_studio.generate(request(PROMPT, 14)).images[0]
    torch._dynamo.reset()
    counters.clear()
    # the eager backend: dynamo captures and caches graphs exactly as for inductor, without a C++ build in CI
    with setting(demo_studio, compile_backend="eager"):
        first = demo_studio.generate(request(PROMPT, 14)).images[0]
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        again = demo_studio.generate(request(PROMPT, 15)).images[0]
        assert counters["stats"]["unique_graphs"] == graphs, "a second job at the same size compiled again"
        unet, _ = _unet(demo_studio)
        assert unet._compiled_call_impl is not None
    assert _diff(plain, first) <= 2 and (score(again).colour, score(again).shape) == ("green", "triangle")
    demo_studio.generate(request(PROMPT, 14))
    assert unet._compiled_call_impl is None
    torch._dynamo.reset()


def test_vae_tiling_is_on_for_the_job_only(demo_studio, monkeypatch):
    _, vae = _unet(demo_studio)
    seen = []
    decode = type(vae).decode

    def spy(self, *a, **k):
        seen.append(self.use_tiling)
        return decode(self, *a, **k)

    monkeypatch.setattr(type(vae), "decode", spy)
    plain = demo_studio.generate(request(PROMPT, 16)).images[0]
    with setting(demo_studio, vae_tiling=True):
        tiled = demo_studio.generate(request(PROMPT, 16)).images[0]
    assert seen == [False, True] and vae.use_tiling is False
    # 64 px is below diffusers' tile size: the picture is the untiled one
    assert _diff(plain, tiled) == 0


def test_bad_speed_settings_are_refused_by_name():
    from studio.errors import StudioError
    from studio.settings import Settings
    with pytest.raises(StudioError, match="sdpa_backend"):
        Settings(sdpa_backend="fast").validate()
    with pytest.raises(StudioError, match="compile_backend"):
        Settings(compile_backend="in ductor").validate()


def test_fused_qkv_keeps_the_picture_follows_loras_and_is_dropped(demo_studio):
    from pathlib import Path

    from tests import lorafiles
    with demo_studio.manager.acquire(TRAINED_NAME, "Automatic") as loaded:
        comps = loaded.components
    sd, _ = lorafiles.kohya_lora(comps, seed=3, rank=4, te=False)
    lorafiles.write(Path(demo_studio.settings.models_dir) / "Lora" / "fq.safetensors", sd,
                    lorafiles.metadata_for(comps))
    styled = f"{PROMPT} <lora:fq:1>"
    plain = demo_studio.generate(request(PROMPT, 17)).images[0]
    plain_lora = demo_studio.generate(request(styled, 17)).images[0]
    attn = comps.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    with setting(demo_studio, fused_qkv=True):
        fused = demo_studio.generate(request(PROMPT, 17))
        qkv = attn.to_qkv
        again = demo_studio.generate(request(PROMPT, 17)).images[0]
        assert attn.to_qkv is qkv, "unchanged weights were fused again"
        fused_lora = demo_studio.generate(request(styled, 17)).images[0]
        assert attn.to_qkv is not qkv, "the LoRA's q / k / v were not fused in"
        back = demo_studio.generate(request(PROMPT, 17)).images[0]
    assert _diff(plain, plain_lora) > 10          # the LoRA changes the picture a lot ...
    assert _diff(plain_lora, fused_lora) <= 2     # ... and the fused layers carry it (stale ones would not)
    assert _diff(plain, fused.images[0]) <= 2 and _diff(plain, again) <= 2 and _diff(plain, back) <= 2
    assert not fused.warnings
    demo_studio.generate(request(PROMPT, 17))
    assert not hasattr(attn, "to_qkv") and not attn.fused_projections
