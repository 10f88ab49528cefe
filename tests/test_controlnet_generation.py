"""ControlNet through the engine: units on txt2img / img2img / hires, caching, infotext, detected maps."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio.controlnet import ControlUnit
from studio.errors import StudioError
from studio.request import GenerationRequest
from tests import controlnets
from tests.tinymodels import make_tiny

BASE = dict(width=64, height=64, steps=3, seed=2, prompt="a house", sampler_name="Euler")


def shapes() -> Image.Image:
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).rectangle((16, 16, 48, 48), outline="black", width=3)
    return img


def px(img):
    return np.asarray(img, dtype=np.int16)


@pytest.fixture()
def cn_studio(settings, models_dir):
    from studio.app import Studio

    cn = controlnets.make_controlnet(make_tiny("sd1", seed=0).unet, seed=1)
    controlnets.write_ldm(cn, models_dir / "ControlNet" / "control_tiny_canny.safetensors") \
        if (models_dir / "ControlNet").mkdir() is None else None
    s = Studio(settings)
    yield s
    s.close()


def unit(studio, **kw):
    return ControlUnit.from_api({"enabled": True, "module": "canny", "model": "control_tiny_canny",
                                 "image": shapes(), **kw}, 0, studio.preprocessors)


def test_unit_acts_and_weight_zero_is_neutral(cn_studio):
    plain = cn_studio.generate(GenerationRequest(**BASE))
    zero = cn_studio.generate(GenerationRequest(**BASE, controlnet_units=(unit(cn_studio, weight=0.0),)))
    full = cn_studio.generate(GenerationRequest(**BASE, controlnet_units=(unit(cn_studio, weight=1.0),)))
    assert np.array_equal(px(plain.images[0]), px(zero.images[0]))
    assert not np.array_equal(px(plain.images[0]), px(full.images[0]))
    assert 'ControlNet 0: "Module: canny, Model: control_tiny_canny [' in full.infotexts[0]
    assert full.control_maps and full.control_maps[0].size == (512, 512)  # at the processor resolution
    assert any(p.endswith("-controlnet0.png") for p in
               [str(x) for x in __import__("pathlib").Path(full.paths[0]).parent.iterdir()])


def test_second_generation_loads_nothing_and_preprocesses_nothing(cn_studio):
    req = GenerationRequest(**BASE, controlnet_units=(unit(cn_studio),))
    cn_studio.generate(req)
    loads, runs = cn_studio.manager.loads, sum(cn_studio.preprocessors.runs.values())
    cn_studio.generate(req.replace(seed=3))
    assert cn_studio.manager.loads == loads and sum(cn_studio.preprocessors.runs.values()) == runs


def test_img2img_image_feeds_a_unit_without_its_own_image_and_hires_works(cn_studio):
    u = ControlUnit.from_api({"enabled": True, "module": "canny", "model": "control_tiny_canny"}, 0,
                             cn_studio.preprocessors)
    res = cn_studio.generate(GenerationRequest(**BASE, mode="img2img", init_images=(shapes(),),
                                               controlnet_units=(u,)))
    assert res.images[0].size == (64, 64)
    hr = cn_studio.generate(GenerationRequest(**BASE, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                                              controlnet_units=(unit(cn_studio),)))
    assert hr.images[0].size == (96, 96)


def test_unknown_model_and_missing_image_are_named(cn_studio):
    with pytest.raises(StudioError) as err:
        cn_studio.generate(GenerationRequest(**BASE, controlnet_units=(unit(cn_studio, model="nope"),)))
    assert "controlnet" in (err.value.field or "")
    u = ControlUnit.from_api({"enabled": True, "module": "canny", "model": "control_tiny_canny"}, 0,
                             cn_studio.preprocessors)
    with pytest.raises(StudioError) as err:
        cn_studio.generate(GenerationRequest(**BASE, controlnet_units=(u,)))
    assert "no input image" in str(err.value)


def test_family_mismatch_names_both(cn_studio):
    with pytest.raises(StudioError) as err:
        cn_studio.generate(GenerationRequest(**{**BASE, "checkpoint": "tiny-sdxl.safetensors"},
                                             controlnet_units=(unit(cn_studio),)))
    assert "control_tiny_canny" in str(err.value) and "tiny-sdxl" in str(err.value)
