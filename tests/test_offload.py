"""--medvram / --lowvram on the CPU: accelerate's offload hooks with the CPU as execution device.

Sequential offload (--lowvram) leaves every parameter on ``meta`` between forwards, as on a GPU, so the same code
paths run: inputs on the execution device, LoRAs written into the hooks' weights, hooks applied once per module.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from studio.request import GenerationRequest
from tests.pictures import mask, picture
from tests import lorafiles
from tests.tinymodels import make_tiny

BASE = dict(width=64, height=64, steps=3, seed=5, save_images=False, sampler_name="Euler", prompt="a cube")


def px(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


REQUESTS = {
    "txt2img": dict(),
    "img2img": dict(mode="img2img", init_images=(picture(),), denoising_strength=0.6),
    "inpaint": dict(mode="inpaint", init_images=(picture(),), mask=mask(), denoising_strength=0.9),
    "inpaint latent noise": dict(mode="inpaint", init_images=(picture(),), mask=mask(), denoising_strength=0.9,
                                 inpainting_fill=2),
    "hires": dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", hr_denoising_strength=0.5),
    "hires latent": dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_denoising_strength=0.5),
    "lora": dict(prompt="a cube <lora:style:1>"),
    "embedding, clip skip 2": dict(prompt="a shiny cube", clip_skip=2),
}


@pytest.fixture()
def lora_models(models_dir):
    sd, _ = lorafiles.kohya_lora(make_tiny("sd1", seed=0), seed=0, rank=4)
    lorafiles.write(models_dir / "Lora" / "style.safetensors", sd, lorafiles.metadata_for(make_tiny("sd1", seed=0)))
    (models_dir / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                "name": "shiny", "step": 10}, models_dir / "embeddings" / "shiny.pt")
    return models_dir


def make_studio(settings, offload: str):
    from studio.app import Studio

    s = Studio(dataclasses.replace(settings, offload=offload))
    s.manager.offload_on_cpu = offload != "none"
    return s


def run_all(studio) -> dict:
    return {name: studio.generate(GenerationRequest(**{**BASE, **kw})) for name, kw in REQUESTS.items()}


def test_offload_modes_give_the_images_of_no_offload(settings, lora_models):
    plain = make_studio(settings, "none")
    try:
        results = run_all(plain)
        want = {k: px(r.images[0]) for k, r in results.items()}
        plain_infotext = results["embedding, clip skip 2"].infotexts[0]
    finally:
        plain.close()
    assert not np.array_equal(want["lora"], want["txt2img"])      # the LoRA changes the image
    assert "TI hashes" in plain_infotext
    for mode in ("medvram", "lowvram"):
        s = make_studio(settings, mode)
        try:
            got = run_all(s)
            unet = s.manager.current_components().unet
            if mode == "lowvram":   # the real offload state: weights are on meta between forwards
                assert next(unet.parameters()).device.type == "meta"
            else:
                assert hasattr(unet, "_hf_hook")
            for name, res in got.items():
                assert np.array_equal(px(res.images[0]), want[name]), (mode, name)
            # the LoRA came off again: the base model is exactly as loaded
            again = s.generate(GenerationRequest(**BASE))
            assert np.array_equal(px(again.images[0]), want["txt2img"]), mode
        finally:
            s.close()


def test_hooks_are_applied_once_per_module(settings, monkeypatch):
    """A new view per pass reuses the hooks and the xformers processors on the shared modules."""
    import accelerate

    from studio import devices

    calls = {"offload": 0, "xformers": 0}
    real = accelerate.cpu_offload_with_hook

    def counting(*a, **k):
        calls["offload"] += 1
        return real(*a, **k)

    monkeypatch.setattr(accelerate, "cpu_offload_with_hook", counting)
    monkeypatch.setattr(devices, "xformers_usable", lambda *a: True)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def fake_xformers(self, *a, **k):   # xformers needs CUDA; count the calls instead
        calls["xformers"] += 1

    monkeypatch.setattr(UNet2DConditionModel, "enable_xformers_memory_efficient_attention", fake_xformers)
    monkeypatch.setattr(AutoencoderKL, "enable_xformers_memory_efficient_attention", fake_xformers)
    s = make_studio(settings, "medvram")
    try:
        s.generate(GenerationRequest(**BASE))
        first = dict(calls)
        assert first == {"offload": 3, "xformers": 2}     # text encoder, UNet, VAE / UNet, VAE
        hook = s.manager.current_components().unet._hf_hook
        s.generate(GenerationRequest(**{**BASE, **REQUESTS["hires"]}))
        s.generate(GenerationRequest(**{**BASE, **REQUESTS["img2img"]}))
        assert calls == first
        assert s.manager.current_components().unet._hf_hook is hook
    finally:
        s.close()


def test_lowvram_models_can_change_tier(settings):
    """Eviction to the RAM tier must not try to copy meta parameters (the weights are in RAM already)."""
    s = make_studio(settings, "lowvram")
    try:
        want = px(s.generate(GenerationRequest(**BASE)).images[0])
        entry = next(e for e in s.manager._entries.values() if e.key[0] == "ckpt")
        s.manager._move(entry, "cpu")
        s.manager._move(entry, "device")
        assert np.array_equal(px(s.generate(GenerationRequest(**BASE)).images[0]), want)
    finally:
        s.close()


@pytest.mark.parametrize("offload", ["medvram", "lowvram"])
def test_controlnet_is_offloaded_with_the_model(settings, models_dir, offload):
    """The cached ControlNet gets its hooks once, like the checkpoint's modules, and the image is unchanged."""
    from studio.controlnet import ControlUnit
    from tests import controlnets

    (models_dir / "ControlNet").mkdir()
    net = controlnets.make_controlnet(make_tiny("sd1", seed=0).unet, seed=1)
    controlnets.write_ldm(net, models_dir / "ControlNet" / "control_tiny_canny.safetensors")
    shapes = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(shapes).rectangle((16, 16, 48, 48), outline="black", width=3)
    images = {}
    for mode in ("none", offload):
        s = make_studio(settings, mode)
        try:
            unit = ControlUnit.from_api({"enabled": True, "module": "canny", "model": "control_tiny_canny",
                                         "image": shapes}, 0, s.preprocessors)
            req = GenerationRequest(**BASE, controlnet_units=(unit,))
            images[mode] = [px(s.generate(req).images[0]) for _ in range(2)]
            cached = [e.value for e in s.manager._entries.values() if e.label.startswith("ControlNet")]
            assert len(cached) == 1 and hasattr(cached[0], "_hf_hook") == (mode != "none")
        finally:
            s.close()
    assert np.array_equal(images["none"][0], images[offload][0])
    assert np.array_equal(images[offload][0], images[offload][1])
