"""FLUX.1 through the studio's one generation path: the pixels of diffusers' FluxPipeline, Forge's guidance
fields, flow samplers, previews, and clear refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio.request import GenerationRequest

BASE = dict(prompt="a red circle on a blue square", negative_prompt="", width=64, height=64, steps=3,
            cfg_scale=1.0, distilled_cfg_scale=3.5, sampler_name="Euler", scheduler="Automatic", seed=7)


def req(**kw) -> GenerationRequest:
    return GenerationRequest(**{**BASE, **kw})


def px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_picture(mine: np.ndarray, theirs: np.ndarray) -> None:
    """diffusers' pixels, give or take float rounding: equal on the machines this was written on; on an AMD EPYC
    one value of the 12288 was 1 grey level off (the same maths, the CPU's kernels rounding one sum the other way)."""
    diff = np.abs(mine - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.001, (diff.max(), int((diff > 0).sum()))


def bare_pipeline(studio, checkpoint: str):
    """diffusers' FluxPipeline over the very modules the studio loaded (its own encoding, sampling, decoding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    with studio.manager.acquire(checkpoint, "Automatic") as loaded:
        c = loaded.components
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config), vae=c.vae,
                        text_encoder=c.text_encoder, tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2,
                        tokenizer_2=c.tokenizer_2, transformer=c.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_txt2img_is_diffusers_flux_pipeline_pixel_for_pixel(flux_studio):
    ours = flux_studio.generate(req(batch_size=2))
    pipe = bare_pipeline(flux_studio, "flux1-dev-tiny.safetensors")
    bare = pipe(prompt=BASE["prompt"], height=64, width=64, num_inference_steps=3, guidance_scale=3.5,
                num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images
    assert len(ours.images) == 2 and px(ours.images[0]).std() > 0
    for mine, theirs in zip(ours.images, bare):
        assert_same_picture(px(mine), px(theirs))
    assert "Distilled CFG Scale: 3.5" in ours.infotexts[0] and "CFG scale: 1," in ours.infotexts[0]


def test_distilled_and_true_guidance_each_change_the_picture(flux_studio):
    base = px(flux_studio.generate(req()).images[0])
    distilled = px(flux_studio.generate(req(distilled_cfg_scale=8.0)).images[0])
    true_cfg = px(flux_studio.generate(req(cfg_scale=4.0, negative_prompt="green")).images[0])
    assert not np.array_equal(base, distilled) and not np.array_equal(base, true_cfg)


def test_schnell_has_no_guidance_input(flux_studio):
    a = flux_studio.generate(req(checkpoint="flux1-schnell-tiny.safetensors"))
    b = flux_studio.generate(req(checkpoint="flux1-schnell-tiny.safetensors", distilled_cfg_scale=9.0))
    assert np.array_equal(px(a.images[0]), px(b.images[0]))
    assert "Distilled CFG Scale" not in a.infotexts[0]


def test_emphasis_weights_the_t5_tokens(flux_studio):
    plain = px(flux_studio.generate(req(prompt="a red circle")).images[0])
    same = px(flux_studio.generate(req(prompt="a (red:1.0) circle")).images[0])
    weighted = px(flux_studio.generate(req(prompt="a (red:1.6) circle")).images[0])
    assert np.array_equal(plain, same) and not np.array_equal(plain, weighted)


@pytest.mark.parametrize("sampler,schedule", [("DPM++ 2M", "Automatic"), ("UniPC", "Automatic"),
                                              ("Euler a", "Automatic"), ("Euler", "Karras")])
def test_flow_samplers_run(flux_studio, sampler, schedule):
    res = flux_studio.generate(req(sampler_name=sampler, scheduler=schedule))
    euler = flux_studio.generate(req())
    a = px(res.images[0])
    assert a.std() > 0 and not np.array_equal(a, px(euler.images[0]))
    assert not res.warnings


def test_a_sampler_with_no_flow_version_runs_as_euler_and_says_so(flux_studio):
    res = flux_studio.generate(req(sampler_name="LMS"))
    assert np.array_equal(px(res.images[0]), px(flux_studio.generate(req()).images[0]))
    assert any("'LMS' has no flow-matching version" in w for w in res.warnings)


def test_sizes_flux_latents_cannot_hold_are_refused(flux_studio):
    with pytest.raises(StudioError, match="must be multiples of 16") as e:
        flux_studio.generate(req(width=72, height=64))
    assert "64x64" in e.value.fix


def test_live_previews_are_drawn_from_packed_latents(flux_studio):
    shown = []

    class Ctx:
        job_id, interrupted, skipped = "", False, False

        def set_progress(self, *a, **k): ...
        def set_preview(self, image): shown.append(image)
        def clear_skip(self): ...

    flux_studio.engine.generate(req(steps=4), Ctx())
    deadline = __import__("time").time() + 10
    while not shown and __import__("time").time() < deadline:
        __import__("time").sleep(0.05)
    assert shown and shown[0].size == (64, 64)


def _init(seed=0):
    from PIL import Image
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_img2img_is_diffusers_flux_img2img(flux_studio):
    from diffusers import FluxImg2ImgPipeline
    init = _init()
    ours = flux_studio.generate(req(mode="img2img", init_images=(init,), denoising_strength=0.6, steps=5,
                                    resize_mode=0))
    p = bare_pipeline(flux_studio, "flux1-dev-tiny.safetensors")
    pipe = FluxImg2ImgPipeline(**p.components)
    pipe.set_progress_bar_config(disable=True)
    # the studio encodes the init image deterministically (the latent distribution's mode, as A1111 does);
    # diffusers would sample it with the generator: hand it the same latents
    from studio import vae_codec
    z = vae_codec.encode(pipe, init, height=64, width=64)
    bare = pipe(prompt=BASE["prompt"], image=z, height=64, width=64, strength=0.6, num_inference_steps=5,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(px(ours.images[0]), px(bare))


def test_inpaint_keeps_the_unmasked_pixels(flux_studio):
    from PIL import Image
    init = _init(1)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    res = flux_studio.generate(req(mode="inpaint", init_images=(init,), mask=mask, denoising_strength=0.9,
                                   mask_blur=0, inpainting_fill=1))
    out, src = px(res.images[0]), px(init)
    assert np.abs(out[:8] - src[:8]).mean() < 12          # outside: the init image (through the VAE)
    assert np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean() > 20   # inside: redrawn


def test_hires_fix_makes_the_bigger_picture(flux_studio):
    res = flux_studio.generate(req(enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_denoising_strength=0.5))
    assert res.images[0].size == (128, 128) and px(res.images[0]).std() > 0
    res = flux_studio.generate(req(enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", hr_denoising_strength=0.5))
    assert res.images[0].size == (96, 96)


def test_bfl_transformer_only_file_takes_its_parts_from_models_text_encoder_and_vae(flux_studio, tmp_path):
    """Forge's layout: flux1-dev.safetensors + models/text_encoder/{clip_l, t5xxl_fp16} + models/VAE/ae."""
    from safetensors.torch import save_file

    from studio.loading.ldm_export import vae_to_ldm
    from tests.tinyflux import flux_state_dict
    s = flux_studio.settings
    with flux_studio.manager.acquire("flux1-dev-tiny.safetensors", "Automatic") as loaded:
        c = loaded.components
    save_file({k: v.contiguous() for k, v in flux_state_dict(c, all_in_one=False).items()},
              str(s.ckpt_path / "flux1-dev-bare.safetensors"))
    te_dir = s.text_encoder_path
    te_dir.mkdir(parents=True)
    save_file({"text_model." + k.removeprefix("text_model."): v.contiguous()
               for k, v in c.text_encoder.state_dict().items() if not k.endswith("position_ids")},
              str(te_dir / "clip_l.safetensors"))
    save_file({k: v.contiguous() for k, v in c.text_encoder_2.state_dict().items()
               if k != "encoder.embed_tokens.weight"}, str(te_dir / "t5xxl_fp16.safetensors"))
    save_file({k: v.contiguous() for k, v in vae_to_ldm(c.vae.state_dict(), prefix="").items()},
              str(s.vae_path / "ae.safetensors") if s.vae_path.is_dir() else str(_mk(s.vae_path) / "ae.safetensors"))
    flux_studio.registry.refresh()
    a = flux_studio.generate(req())
    b = flux_studio.generate(req(checkpoint="flux1-dev-bare.safetensors"))
    assert np.array_equal(px(a.images[0]), px(b.images[0]))
    with flux_studio.manager.acquire("flux1-dev-bare.safetensors", "Automatic") as loaded:
        notes = " ".join(loaded.components.notes)
    assert "clip from clip_l.safetensors" in notes and "t5 from t5xxl_fp16.safetensors" in notes and \
        "vae16 from ae.safetensors" in notes


def _mk(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
