"""End-to-end engine behaviour on tiny models: pixels, seeds, samplers, infotext, outputs."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from studio.request import GenerationRequest

TINY = dict(width=64, height=64, steps=3, cfg_scale=5.0, prompt="a red cube on a table", negative_prompt="blurry")


def req(**kw) -> GenerationRequest:
    return GenerationRequest(**{**TINY, **kw})


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_same_seed_same_pixels_and_different_seed_differs(studio):
    a = studio.generate(req(seed=42, sampler_name="Euler a"))
    b = studio.generate(req(seed=42, sampler_name="Euler a"))
    c = studio.generate(req(seed=43, sampler_name="Euler a"))
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))


def test_identical_to_bare_diffusers_pipeline(studio, models_dir):
    """The studio (single file) and diffusers' own from_pretrained (folder of the same weights) agree exactly."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    ours = studio.generate(req(seed=7, sampler_name="DPM++ 2M", scheduler="Karras", batch_size=2))
    pipe = StableDiffusionPipeline.from_pretrained(models_dir / "Stable-diffusion" / "tiny-sd1-diffusers",
                                                   local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    bare = pipe(prompt=TINY["prompt"], negative_prompt=TINY["negative_prompt"], num_inference_steps=3,
                guidance_scale=5.0, width=64, height=64, num_images_per_prompt=2,
                generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images
    for mine, theirs in zip(ours.images, bare):
        assert np.array_equal(pixels(mine), pixels(theirs))


def test_single_file_and_folder_give_same_pixels(studio):
    a = studio.generate(req(seed=3, checkpoint="tiny-sd1.safetensors"))
    b = studio.generate(req(seed=3, checkpoint="tiny-sd1-diffusers"))
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_batch_seeds_follow_a1111(studio):
    res = studio.generate(req(seed=100, batch_size=2, n_iter=2, sampler_name="Euler"))
    assert res.seeds == [100, 101, 102, 103]
    assert len(res.images) == 4
    single = studio.generate(req(seed=103, sampler_name="Euler"))
    diff = np.abs(pixels(res.images[3]) - pixels(single.images[0])).max()
    assert diff <= 2  # batched vs single UNet calls may differ in the last float bit only
    assert [re.search(r"Seed: (\d+)", t).group(1) for t in res.infotexts] == ["100", "101", "102", "103"]


def test_random_seed_is_recorded(studio):
    res = studio.generate(req(seed=-1, batch_size=2))
    assert res.seeds[1] == res.seeds[0] + 1
    again = studio.generate(req(seed=res.seeds[0], batch_size=2))
    assert np.array_equal(pixels(res.images[1]), pixels(again.images[1]))


def test_variation_seed_changes_image_and_is_in_infotext(studio):
    base = studio.generate(req(seed=5))
    var = studio.generate(req(seed=5, subseed=9, subseed_strength=0.5))
    assert not np.array_equal(pixels(base.images[0]), pixels(var.images[0]))
    assert "Variation seed: 9, Variation seed strength: 0.5" in var.infotexts[0]


SAMPLERS = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
            "DPM++ 2S a", "DPM++ 3M SDE", "DDIM", "PLMS", "UniPC", "LCM"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs(studio, sampler):
    res = studio.generate(req(seed=1, steps=4, sampler_name=sampler, save_images=False))
    arr = pixels(res.images[0])
    assert arr.shape == (64, 64, 3) and arr.std() > 0


@pytest.mark.parametrize("legacy,sampler,schedule", [("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
                                                     ("Euler a", "Euler a", "Automatic")])
def test_legacy_sampler_names(studio, legacy, sampler, schedule):
    res = studio.generate(req(seed=1, sampler_name=legacy, save_images=False))
    assert f"Sampler: {sampler}" in res.infotexts[0]
    if schedule != "Automatic":
        assert f"Schedule type: {schedule}" in res.infotexts[0]


def test_outputs_saved_with_parseable_infotext(studio, settings, tmp_path):
    from studio.infotext import params_to_request_fields, parse_infotext, read_infotext

    r = req(seed=11, clip_skip=2, sampler_name="DPM++ 2M", scheduler="Karras", prompt="castle, (sunset:1.2)")
    res = studio.generate(r)
    path = res.paths[0]
    assert re.search(r"txt2img-images/\d{4}-\d{2}-\d{2}/00000-11\.png$", path)
    text = read_infotext(path)
    assert text == res.infotexts[0]
    assert f"Model hash: {res.model_hash}" in text and len(res.model_hash) == 10
    assert "Model: tiny-sd1" in text
    fields = params_to_request_fields(parse_infotext(text))
    back = GenerationRequest(**{k: v for k, v in fields.items() if k in GenerationRequest.__dataclass_fields__})
    for name in ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed", "width",
                 "height", "clip_skip"):
        assert getattr(back, name) == getattr(r, name), name
    res2 = studio.generate(r.replace(seed=12))
    assert res2.paths[0].endswith("00001-12.png")


def test_clip_skip_changes_conditioning(studio):
    a = studio.generate(req(seed=2, clip_skip=1, save_images=False))
    b = studio.generate(req(seed=2, clip_skip=2, save_images=False))
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


@pytest.mark.parametrize("name", ["tiny-sd2.safetensors", "tiny-sdxl.safetensors"])
def test_other_families_generate(studio, name):
    res = studio.generate(req(seed=1, checkpoint=name, save_images=False))
    assert res.images[0].size == (64, 64)
    info = studio.registry.find_checkpoint(name)
    assert info.family == {"tiny-sd2.safetensors": "sd2", "tiny-sdxl.safetensors": "sdxl"}[name]


def test_vae_choice(studio):
    own = studio.generate(req(seed=4, save_images=False))
    other = studio.generate(req(seed=4, vae="tiny-vae.safetensors", save_images=False))
    assert not np.array_equal(pixels(own.images[0]), pixels(other.images[0]))
    assert "VAE: tiny-vae.safetensors" in other.infotexts[0] and "VAE hash: " in other.infotexts[0]


def test_nan_vae_is_retried_in_fp32(settings):
    """A half-precision VAE that yields NaNs is decoded again in fp32, and the user is told."""
    from studio.app import Studio

    s = Studio(settings.replace(precision="bf16"))
    try:
        with s.manager.acquire() as loaded:
            vae = loaded.components.vae

        def poison(module, args, output):
            return output if output.dtype == torch.float32 else output * float("nan")

        handle = vae.decoder.conv_out.register_forward_hook(poison)
        res = s.generate(req(seed=1, save_images=False))
        handle.remove()
        assert any("NaN" in w for w in res.warnings)
        assert not np.isnan(pixels(res.images[0])).any() and pixels(res.images[0]).std() > 0
        assert vae.dtype == torch.float32
    finally:
        s.close()
