"""SD3.5 as Stability publishes it: detected, loaded exactly, and drawing diffusers' own pixels through the
studio's one generation path (txt2img, img2img, inpaint), its LoRAs' family told apart from FLUX's."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from studio import families
from studio.loading.state_dict import read_header_shapes
from studio.request import GenerationRequest


@pytest.fixture(scope="module")
def sd3_store(tmp_path_factory):
    from tests.tinysd3 import make_tiny_sd3, write_sd3_single_file
    root = tmp_path_factory.mktemp("sd3-store")
    (root / "Stable-diffusion").mkdir()
    write_sd3_single_file(make_tiny_sd3(seed=1), root / "Stable-diffusion" / "sd3.5_medium_tiny.safetensors")
    return root


@pytest.fixture()
def sd3_studio(sd3_store, tmp_path):
    from studio.app import Studio
    from studio.settings import Settings
    shutil.copytree(sd3_store, tmp_path / "models")
    s = Studio(Settings(models_dir=str(tmp_path / "models"), data_dir=str(tmp_path / "data"),
                        outdir=str(tmp_path / "out"), default_checkpoint="sd3.5_medium_tiny.safetensors"))
    yield s
    s.close()


BASE = dict(prompt="a red circle on a blue square", negative_prompt="blurry", width=64, height=64, steps=3,
            cfg_scale=4.5, sampler_name="Euler", seed=11)


def px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_header_says_sd3(sd3_store):
    path = sd3_store / "Stable-diffusion" / "sd3.5_medium_tiny.safetensors"
    assert families.detect_ldm(read_header_shapes(str(path)), str(path)).name == "sd3"


def test_txt2img_is_diffusers_sd3_pipeline(sd3_studio):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    ours = sd3_studio.generate(GenerationRequest(**BASE))
    with sd3_studio.manager.acquire("", "Automatic") as loaded:
        c = loaded.components
    pipe = StableDiffusion3Pipeline(transformer=c.unet, vae=c.vae, scheduler=FlowMatchEulerDiscreteScheduler.from_config(
        c.scheduler_config), **c.text_modules())
    pipe.set_progress_bar_config(disable=True)
    bare = pipe(prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"], height=64, width=64,
                num_inference_steps=3, guidance_scale=4.5, generator=torch.Generator().manual_seed(11)).images[0]
    assert px(ours.images[0]).std() > 0 and np.array_equal(px(ours.images[0]), px(bare))
    assert "Model: sd3.5_medium_tiny" in ours.infotexts[0] and "Distilled" not in ours.infotexts[0]


def test_img2img_and_inpaint_run(sd3_studio):
    from PIL import Image
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    a = sd3_studio.generate(GenerationRequest(**BASE, mode="img2img", init_images=(init,), denoising_strength=0.5))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    b = sd3_studio.generate(GenerationRequest(**BASE, mode="inpaint", init_images=(init,), mask=mask, mask_blur=0,
                                              denoising_strength=0.9))
    assert a.images[0].size == (64, 64) and px(a.images[0]).std() > 0
    out, src = px(b.images[0]), px(init)
    assert np.abs(out[:8] - src[:8]).mean() < 12 and np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean() > 20


def test_lora_families_are_told_apart():
    assert families.from_lora(set(), unet_layers=frozenset({"joint_blocks"})).name == "sd3"
    assert families.from_lora(set(), unet_layers=frozenset({"double_blocks"})).name == "flux"
    assert families.from_version("sd3.5_medium").name == "sd3"


def test_hires_fix_and_merge(sd3_studio):
    from studio.loading.single_file import load_single_file
    from studio.merge import MergeSpec, merge_checkpoints
    res = sd3_studio.generate(GenerationRequest(**BASE, enable_hr=True, hr_scale=2.0, hr_upscaler="Latent",
                                                hr_denoising_strength=0.5))
    assert res.images[0].size == (128, 128) and px(res.images[0]).std() > 0
    out = merge_checkpoints(MergeSpec(a="sd3.5_medium_tiny", b="sd3.5_medium_tiny", multiplier=0.5,
                                      output_name="sd3-merge"), sd3_studio.registry, sd3_studio.settings)
    assert load_single_file(out).family == "sd3"
