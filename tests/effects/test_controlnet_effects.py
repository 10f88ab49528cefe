"""The demo ControlNet (studio/demo_assets/demo-canny.safetensors) steers the demo model, through /sdapi/v1/txt2img
with A1111 ControlNet units: the object goes where the edge map says while the prompt is silent on position.

Pictures: ``tools.train_demo_controlnet.control_pairs`` (small / medium shapes away from the centre, 20 seeds); the
scorer's object mask is compared with the control picture's. Measured (the model card, 10000 steps): median IoU
0.71 with the unit, 0.00 without, 0.30 with guidance end 0.3; two units: both squares drawn."""
from __future__ import annotations

import base64
import io
import statistics

import numpy as np
import pytest
from PIL import Image

from studio.demo import CONTROLNET_NAME
from tools.train_demo_controlnet import CANNY, control_pairs

SEEDS = 20
MODEL = CONTROLNET_NAME.rsplit(".", 1)[0]


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _unit(image: Image.Image, **kw) -> dict:
    return {"enabled": True, "model": MODEL, "image": _b64(image), "weight": 1.0, "resize_mode": "Crop and Resize",
            "control_mode": "Balanced", "guidance_start": 0.0, "guidance_end": 1.0, **CANNY, **kw}


def _draw(client, prompt: str, seed: int, units: list[dict] | None) -> Image.Image:
    body = {"prompt": prompt, "seed": seed, "steps": 20, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "cfg_scale": 7, "width": 64, "height": 64}
    if units is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": units}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")


def _ious(client, **unit) -> list[float]:
    from studio.demo_world import mask_iou, score
    out = []
    for prompt, seed, sample in control_pairs(SEEDS):
        units = [_unit(sample.image, **unit)] if unit.get("model", MODEL) else None
        out.append(mask_iou(score(_draw(client, prompt, seed, units)).mask, score(sample.image).mask))
    return out


@pytest.fixture(scope="module")
def followed(api_client):
    return {"unit": _ious(api_client), "none": _ious(api_client, model=""),
            "end": _ious(api_client, guidance_end=0.3)}


def test_the_object_follows_the_edge_map(followed):
    assert statistics.median(followed["unit"]) >= 0.7, followed["unit"]
    assert statistics.median(followed["none"]) <= 0.3, followed["none"]


def test_guidance_end_0_3_weakens_it(followed):
    assert statistics.median(followed["end"]) <= statistics.median(followed["unit"]) - 0.15, followed


def test_weight_zero_is_no_unit_bit_for_bit(api_client):
    prompt, seed, sample = control_pairs(1)[0]
    plain = _draw(api_client, prompt, seed, None)
    zero = _draw(api_client, prompt, seed, [_unit(sample.image, weight=0.0)])
    assert np.array_equal(np.asarray(plain), np.asarray(zero))


def _object_pixels(image: Image.Image, background: str) -> np.ndarray:
    from studio.demo_world.palette import rgb
    px = np.asarray(image, dtype=np.int16)
    return np.abs(px - np.array(rgb(background), dtype=np.int16)).sum(axis=2) > 90


def test_two_units_are_both_honoured(api_client):
    """Two edge maps, one shape in the top left and one in the bottom right: with both units both places hold
    an object; with the first unit alone the bottom right stays background."""
    from studio.demo_world import World, score
    kw = {"shape": "square", "colour": "red", "background": "white", "size": "small"}
    a = World(1, position="top left", **kw).sample(0, 64).image
    b = World(1, position="bottom right", **kw).sample(0, 64).image
    mask_a, mask_b = score(a).mask, score(b).mask
    both, one = [], []
    for seed in range(300, 300 + 8):
        two = _object_pixels(_draw(api_client, "a red square on a white background", seed,
                                   [_unit(a), _unit(b)]), "white")
        both.append(min(two[mask_a].mean(), two[mask_b].mean()))
        first = _object_pixels(_draw(api_client, "a red square on a white background", seed, [_unit(a)]), "white")
        one.append(first[mask_b].mean())
    assert statistics.median(both) >= 0.5, both
    assert statistics.median(one) <= 0.2, one
