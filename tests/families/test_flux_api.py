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
