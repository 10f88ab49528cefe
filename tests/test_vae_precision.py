"""The VAE at its own dtype: --no-half-vae and the fp32 NaN retry beside an fp16 UNet, SDXL's force_upcast,
NaNs from the UNet, and a decode out of memory falling back to VAE tiling."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio.request import GenerationRequest
from tests.pictures import mask, picture

BASE = dict(width=64, height=64, steps=2, seed=5, save_images=False, sampler_name="Euler", prompt="a cube")


MODES = {
    "img2img": dict(mode="img2img", init_images=(picture(),), denoising_strength=0.6),
    "inpaint": dict(mode="inpaint", init_images=(picture(),), mask=mask(), denoising_strength=0.9),
    "inpaint original": dict(mode="inpaint", init_images=(picture(),), mask=mask(), denoising_strength=0.9,
                             inpainting_fill=1),
    "hires": dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", hr_denoising_strength=0.5),
}


def make_studio(settings, **kw):
    from studio.app import Studio

    return Studio(dataclasses.replace(settings, **kw))


def run(studio, **kw):
    return studio.generate(GenerationRequest(**{**BASE, **kw}))


def test_fp32_vae_beside_fp16_unet_runs_every_mode(settings):
    s = make_studio(settings, precision="fp16", no_half_vae=True)
    try:
        for name, kw in MODES.items():
            res = run(s, **kw)
            assert np.asarray(res.images[0]).std() > 0, name
        comps = s.manager.current_components()
        assert comps.vae.dtype == torch.float32 and comps.unet.dtype == torch.float16
    finally:
        s.close()


@pytest.mark.parametrize("checkpoint", ["tiny-sd1.safetensors", "tiny-sdxl.safetensors"])
def test_after_a_nan_retry_the_fp32_vae_keeps_working(settings, checkpoint):
    """The first decode gives NaNs in fp16: retried in fp32, and img2img / inpaint / hires still run after."""
    s = make_studio(settings, precision="fp16", default_checkpoint=checkpoint)
    try:
        s.manager.load(checkpoint)
        vae = s.manager.current_components().vae
        real = vae.decode

        def nan_in_half(z, *a, **k):
            out = real(z, *a, **k)
            if vae.dtype == torch.float16:
                out = (torch.full_like(out[0], float("nan")),)
            return out

        vae.decode = nan_in_half
        first = run(s, checkpoint=checkpoint)
        assert any("decoded again in fp32" in w for w in first.warnings)
        assert vae.dtype == torch.float32
        for name, kw in MODES.items():
            res = run(s, checkpoint=checkpoint, **kw)
            assert np.asarray(res.images[0]).std() > 0, name
            assert vae.dtype == torch.float32, name    # SDXL's force_upcast would cast it back to fp16
    finally:
        s.close()


def test_sdxl_no_half_vae_stays_fp32(settings):
    s = make_studio(settings, precision="fp16", no_half_vae=True, default_checkpoint="tiny-sdxl.safetensors")
    try:
        for name, kw in MODES.items():
            run(s, **kw)
            assert s.manager.current_components().vae.dtype == torch.float32, name
    finally:
        s.close()


def test_nans_from_the_unet_say_what_to_do(studio):
    studio.manager.load()
    unet = studio.manager.current_components().unet
    handle = unet.register_forward_hook(lambda m, a, out: (torch.full_like(out[0], float("nan")),))
    try:
        with pytest.raises(StudioError, match="--precision fp32"):
            run(studio)
    finally:
        handle.remove()
    assert np.asarray(run(studio).images[0]).std() > 0      # nothing stays broken


def test_decode_out_of_memory_retries_with_tiling(studio):
    want = run(studio, **MODES["hires"]).images[0]
    vae = studio.manager.current_components().vae
    real, failed = vae.decode, []

    def oom_untiled(z, *a, **k):
        if not vae.use_tiling and not failed:
            failed.append(z.shape)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(z, *a, **k)

    vae.decode = oom_untiled
    res = run(studio, **MODES["hires"])
    assert failed and any("VAE tiling" in w for w in res.warnings)
    assert vae.use_tiling is False                               # tiling is off again afterwards
    assert np.array_equal(np.asarray(res.images[0]), np.asarray(want))   # tiny image: one tile, same pixels


def test_decode_out_of_memory_even_tiled_is_a_clear_error(studio):
    studio.manager.load()
    vae = studio.manager.current_components().vae

    def always_oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    vae.decode = always_oom
    with pytest.raises(StudioError, match="--medvram"):
        run(studio)
    assert vae.use_tiling is False


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_fp32_vae_with_controlnet(settings, models_dir, mode):
    """ControlNet img2img / inpaint pipelines with an fp32 VAE beside an fp16 UNet and ControlNet."""
    from studio.controlnet import ControlUnit
    from tests import controlnets
    from tests.tinymodels import make_tiny

    (models_dir / "ControlNet").mkdir()
    net = controlnets.make_controlnet(make_tiny("sd1", seed=0).unet, seed=1)
    controlnets.write_ldm(net, models_dir / "ControlNet" / "control_tiny_canny.safetensors")
    s = make_studio(settings, precision="fp16", no_half_vae=True)
    try:
        unit = ControlUnit.from_api({"enabled": True, "module": "canny", "model": "control_tiny_canny",
                                     "image": picture()}, 0, s.preprocessors)
        res = run(s, controlnet_units=(unit,), **MODES[mode])
        assert np.asarray(res.images[0]).std() > 0
        assert not any("not supported" in w for w in res.warnings)
        assert s.manager.current_components().vae.dtype == torch.float32
    finally:
        s.close()
