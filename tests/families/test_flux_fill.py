"""FLUX.1 Fill (384 input channels: latents + masked picture + 8x8 mask) through the studio: it serves txt2img,
img2img, inpaint and hires fix through diffusers' FluxFillPipeline, pixel for pixel."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from studio.request import GenerationRequest

FILL = "flux1-fill-dev-tiny.safetensors"
BASE = dict(prompt="a red circle on a blue square", negative_prompt="", width=64, height=64, steps=3,
            cfg_scale=1.0, distilled_cfg_scale=30.0, sampler_name="Euler", scheduler="Automatic", seed=7,
            checkpoint=FILL)


@pytest.fixture(scope="module")
def fill_studio(flux_store, tmp_path_factory):
    from studio.app import Studio
    from studio.settings import Settings
    from tests.tinyflux import make_tiny_flux, write_flux_single_file
    tmp = tmp_path_factory.mktemp("flux-fill")
    models = tmp / "models"
    shutil.copytree(flux_store, models)
    write_flux_single_file(make_tiny_flux(seed=4, guidance=True, in_channels=384), models / "Stable-diffusion" / FILL)
    s = Studio(Settings(models_dir=str(models), data_dir=str(tmp / "data"), outdir=str(tmp / "outputs"),
                        default_checkpoint=FILL, preview_every=0))
    yield s
    s.close()


def req(**kw) -> GenerationRequest:
    return GenerationRequest(**{**BASE, **kw})


def px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def fill_pipeline(studio):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
    with studio.manager.acquire(FILL, "Automatic") as loaded:
        c = loaded.components
    pipe = FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config), vae=c.vae,
                            text_encoder=c.text_encoder, tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2,
                            tokenizer_2=c.tokenizer_2, transformer=c.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe, c


def _init(seed: int = 1) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_fill_checkpoint_is_an_inpainting_flux_with_fill_defaults(fill_studio):
    _, c = fill_pipeline(fill_studio)
    assert c.family == "flux" and c.in_channels == 384 and c.is_inpaint
    assert c.spec.generation_defaults(c)["distilled_cfg_scale"] == 30.0


def test_fill_inpaint_is_diffusers_flux_fill(fill_studio):
    init = _init()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    ours = fill_studio.generate(req(mode="inpaint", init_images=(init,), mask=mask, denoising_strength=1.0,
                                    mask_blur=0, inpainting_fill=1, resize_mode=0))
    pipe, _ = fill_pipeline(fill_studio)
    bare = pipe(prompt=BASE["prompt"], image=init, mask_image=mask, height=64, width=64, strength=1.0,
                num_inference_steps=3, guidance_scale=30.0, generator=torch.Generator().manual_seed(7)).images[0]
    out, ref, src = px(ours.images[0]), px(bare), px(init)
    # inside the mask: the pipeline's picture exactly; outside: the init picture pasted back (A1111's overlay)
    assert np.array_equal(out[16:48, 16:48], ref[16:48, 16:48])
    assert np.array_equal(out[:16], src[:16]) and np.abs(out[20:44, 20:44] - src[20:44, 20:44]).mean() > 20
    assert not ours.warnings


def test_fill_txt2img_and_img2img_draw_through_a_full_mask(fill_studio):
    pipe, _ = fill_pipeline(fill_studio)
    ours = fill_studio.generate(req())
    bare = pipe(prompt=BASE["prompt"], image=Image.new("RGB", (64, 64), (127, 127, 127)),
                mask_image=Image.new("L", (64, 64), 255), height=64, width=64, strength=1.0, num_inference_steps=3,
                guidance_scale=30.0, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(px(ours.images[0]), px(bare))
    init = _init(2)
    i2i = fill_studio.generate(req(mode="img2img", init_images=(init,), denoising_strength=0.6, steps=5,
                                   resize_mode=0))
    bare = pipe(prompt=BASE["prompt"], image=init, mask_image=Image.new("L", (64, 64), 255), height=64, width=64,
                strength=0.6, num_inference_steps=5, guidance_scale=30.0,
                generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(px(i2i.images[0]), px(bare))


def test_fill_hires_fix_and_cfg_warning(fill_studio):
    res = fill_studio.generate(req(enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_denoising_strength=0.5))
    assert res.images[0].size == (128, 128) and px(res.images[0]).std() > 0
    res = fill_studio.generate(req(cfg_scale=4.0, negative_prompt="green"))
    assert any("takes no negative prompt" in w for w in res.warnings)
    assert np.array_equal(px(res.images[0]), px(fill_studio.generate(req()).images[0]))
