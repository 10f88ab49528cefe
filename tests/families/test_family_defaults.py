"""The generation values a checkpoint's family starts from, told from its header before it is loaded (Forge's
presets), and the UI rule that moves a field only while it still holds the previous family's value."""
from __future__ import annotations

import shutil

import pytest

from webui.family_defaults import follow


@pytest.fixture()
def mixed_studio(settings, models_dir, flux_store):
    from studio.app import Studio
    for name in ("flux1-dev-tiny.safetensors", "flux1-schnell-tiny.safetensors", "FLUX.1-dev-tiny"):
        src = flux_store / "Stable-diffusion" / name
        dst = models_dir / "Stable-diffusion" / name
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    s = Studio(settings)
    yield s
    s.close()


def test_each_family_has_its_values_without_loading(mixed_studio):
    s = mixed_studio
    sd1 = s.generation_defaults("tiny-sd1.safetensors")
    assert sd1 == {"steps": 20, "cfg_scale": 7.0, "sampler_name": "DPM++ 2M", "scheduler": "Automatic",
                   "width": 512, "height": 512}
    sdxl = s.generation_defaults("tiny-sdxl.safetensors")
    assert sdxl["cfg_scale"] == 5.0 and (sdxl["width"], sdxl["height"]) == (1024, 1024)
    dev = s.generation_defaults("flux1-dev-tiny.safetensors")
    assert {k: dev[k] for k in ("steps", "cfg_scale", "distilled_cfg_scale", "sampler_name", "scheduler")} == \
        {"steps": 20, "cfg_scale": 1.0, "distilled_cfg_scale": 3.5, "sampler_name": "Euler", "scheduler": "Simple"}
    assert s.generation_defaults("flux1-schnell-tiny.safetensors")["steps"] == 4   # the variant, from the header
    assert s.generation_defaults("FLUX.1-dev-tiny")["cfg_scale"] == 1.0            # a diffusers folder
    assert s.manager.loads == 0, "telling the defaults loaded a model"
    assert s.generation_defaults("no-such-model") is None


def test_the_loaded_variant_and_a_declared_size_win(mixed_studio, models_dir):
    from safetensors.torch import load_file, save_file
    s = mixed_studio
    s.manager.load("flux1-schnell-tiny.safetensors")
    assert s.generation_defaults("flux1-schnell-tiny.safetensors")["steps"] == 4
    path = models_dir / "Stable-diffusion" / "tiny-sdxl.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"modelspec.resolution": "768x1344"})
    s.registry.refresh()
    got = s.generation_defaults("tiny-sdxl.safetensors")
    assert (got["width"], got["height"]) == (768, 1344) and got["cfg_scale"] == 5.0


def test_a_pickle_is_told_once_it_was_loaded(mixed_studio, models_dir):
    import torch
    from safetensors.torch import load_file
    path = models_dir / "Stable-diffusion" / "tiny-sdxl-pickled.ckpt"
    torch.save({"state_dict": load_file(str(models_dir / "Stable-diffusion" / "tiny-sdxl.safetensors"))}, path)
    s = mixed_studio
    s.registry.refresh()
    assert s.generation_defaults("tiny-sdxl-pickled.ckpt") is None        # no header to read
    s.manager.load("tiny-sdxl-pickled.ckpt")
    assert s.generation_defaults("tiny-sdxl-pickled.ckpt")["cfg_scale"] == 5.0


def test_a_field_moves_only_while_it_holds_the_previous_familys_value():
    flux = {"steps": 20, "cfg_scale": 1.0, "distilled_cfg_scale": 3.5, "sampler_name": "Euler",
            "scheduler": "Simple"}
    # first sync on page load: the fields hold what they were built with
    fields = [("cfg_scale", 7.0), ("steps", 33), ("sampler_name", "DPM++ 2M"), ("scheduler", "Automatic")]
    expected, moved = follow(flux, None, fields)
    assert moved == [1.0, None, "Euler", "Simple"]            # 33 steps was the user's choice: kept
    # back to SD 1.5: the fields FLUX set return; one the user changed since stays
    sd1 = {"steps": 20, "cfg_scale": 7.0, "sampler_name": "DPM++ 2M", "scheduler": "Automatic"}
    _, moved = follow(sd1, expected, [("cfg_scale", 1.0), ("sampler_name", "Euler a"), ("scheduler", "Simple")])
    assert moved == [7.0, None, "Automatic"]
    # a checkpoint whose family cannot be told moves nothing and keeps the expectation
    same, moved = follow(None, expected, fields)
    assert moved == [None] * 4 and same == expected
