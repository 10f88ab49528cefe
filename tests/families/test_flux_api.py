"""FLUX.1 over the A1111 REST API: Forge's distilled_cfg_scale and the flow samplers under A1111 names."""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image

from tests.api.conftest import make_app, serve


def test_txt2img_takes_forges_distilled_cfg_scale(flux_studio):
    body = dict(prompt="a red circle", width=64, height=64, steps=3, cfg_scale=1, sampler_name="Euler", seed=5)
    with serve(make_app(flux_studio)) as url:
        a = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "distilled_cfg_scale": 2.0}, timeout=120)
        b = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "distilled_cfg_scale": 6.0}, timeout=120)
        bad = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "width": 72}, timeout=120)
    assert a.status_code == 200, a.text
    info = a.json()["info"]
    assert "Distilled CFG Scale: 2," in info and "Model: flux1-dev-tiny" in info
    pa, pb = (np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))) for r in (a, b))
    assert pa.shape == (64, 64, 3) and not np.array_equal(pa, pb)
    assert bad.status_code == 422 and "multiples of 16" in bad.text


def test_an_sd_controlnet_on_flux_names_both_families(flux_studio):
    """FLUX takes no ControlNet here: an SD1 one sent with a FLUX checkpoint is a 4xx naming both, and the
    studio goes on generating."""
    from tests import controlnets, tinymodels
    from tests.api.test_controlnet_api import b64, rectangle
    cn_dir = flux_studio.settings.controlnet_path
    cn_dir.mkdir(parents=True, exist_ok=True)
    net = controlnets.make_controlnet(tinymodels.make_tiny("sd1", seed=0).unet, seed=1)
    controlnets.write_ldm(net, cn_dir / "control_sd1_canny.safetensors")
    body = dict(prompt="a red circle", width=64, height=64, steps=2, cfg_scale=1, sampler_name="Euler", seed=5)
    units = [{"enabled": True, "module": "canny", "model": "control_sd1_canny", "image": b64(rectangle()),
              "weight": 1.0, "processor_res": 64}]
    with serve(make_app(flux_studio)) as url:
        r = httpx.post(f"{url}/sdapi/v1/txt2img", timeout=120,
                       json={**body, "alwayson_scripts": {"controlnet": {"args": units}}})
        ok = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert 400 <= r.status_code < 500, r.text
    assert "SD 1.x" in r.text and "FLUX.1" in r.text and "Internal" not in r.text
    assert ok.status_code == 200
