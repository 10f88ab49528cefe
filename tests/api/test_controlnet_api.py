"""The ControlNet extension's API (/controlnet/*, alwayson_scripts units) and an inpainting checkpoint, over HTTP.

This module's studio has its own models folder: tiny-sd1, a 9-channel tiny inpainting checkpoint, and a tiny
ControlNet built from the tiny UNet, written before the server starts.
"""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from .conftest import make_studio, tiny_body

CN = "control_tiny_canny"


@pytest.fixture(scope="module")
def api_studio(model_store, tmp_path_factory):
    from tests import controlnets, tinymodels

    tmp = tmp_path_factory.mktemp("cn-api")
    models = tmp / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "ControlNet").mkdir()
    shutil.copy(model_store / "Stable-diffusion" / "tiny-sd1.safetensors", models / "Stable-diffusion")
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=9, in_channels=9),
                                 models / "Stable-diffusion" / "tiny-sd1-inpainting.safetensors")
    net = controlnets.make_controlnet(tinymodels.make_tiny("sd1", seed=0).unet, seed=1)
    controlnets.write_ldm(net, models / "ControlNet" / f"{CN}.safetensors")
    studio = make_studio(models, tmp / "data", tmp / "outputs")
    yield studio
    studio.queue.interrupt()
    studio.close()


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def rectangle(size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).rectangle((16, 16, 48, 48), outline="black", width=3)
    return img


def unit(**kw) -> dict:
    return {"enabled": True, "module": "canny", "model": CN, "image": b64(rectangle()), "weight": 1.0,
            "resize_mode": "Crop and Resize", "control_mode": "Balanced", "processor_res": 64,
            "threshold_a": 100, "threshold_b": 200, "guidance_start": 0.0, "guidance_end": 1.0,
            "pixel_perfect": False, "low_vram": False, **kw}


def generate(client, path="/sdapi/v1/txt2img", units=None, **kw) -> dict:
    body = tiny_body(**kw)
    if units is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": units}}
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    out["info"] = json.loads(out["info"])
    return out


def pixels(out: dict) -> np.ndarray:
    return np.asarray(decode(out["images"][0]).convert("RGB"), dtype=np.int16)


def test_version_settings_models_and_modules(client):
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    models = client.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
    assert len(models) == 1 and models[0].startswith(f"{CN} [")
    modules = client.get("/controlnet/module_list").json()
    assert "canny" in modules["module_list"] and "none" in modules["module_list"]
    canny = modules["module_detail"]["canny"]
    assert canny["model_free"] is True
    assert [s["name"] for s in canny["sliders"]] == ["Resolution", "Canny Low Threshold", "Canny High Threshold"]
    assert canny["sliders"][1] == {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1}
    assert modules["module_detail"]["depth_midas"]["model_free"] is False
    aliased = client.get("/controlnet/module_list", params={"alias_names": "true"}).json()
    assert len(aliased["module_list"]) == len(modules["module_list"]) and set(aliased["module_detail"]) == \
        set(aliased["module_list"])


def test_detect_returns_a_canny_map(client):
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_processor_res": 64,
                                                "controlnet_input_images": [b64(rectangle())],
                                                "controlnet_threshold_a": 100, "controlnet_threshold_b": 200})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == "Success" and len(body["images"]) == 1
    edges = np.asarray(decode(body["images"][0]).convert("L"))
    assert edges.shape == (64, 64)
    assert edges[14:20, 20:44].max() == 255 and edges[20:44, 14:20].max() == 255   # the rectangle's sides
    assert edges[:8].max() == 0 and edges[26:38, 26:38].max() == 0                 # background, inside


@pytest.mark.parametrize("change,status,field", [
    ({"controlnet_module": "no_such_module"}, 422, "controlnet_module"),
    ({"controlnet_input_images": []}, 422, "controlnet_input_images"),
    ({"controlnet_input_images": ["%%%"]}, 422, "controlnet_input_images.0"),
    ({"controlnet_masks": ["not an image"]}, 422, "controlnet_masks.0"),
    ({"controlnet_module": "depth_midas"}, 422, "controlnet_module"),
], ids=["module", "no-images", "bad-image", "bad-mask", "missing-weights"])
def test_detect_errors(client, change, status, field):
    body = {"controlnet_module": "canny", "controlnet_input_images": [b64(rectangle())], **change}
    r = client.post("/controlnet/detect", json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    if change.get("controlnet_module") == "depth_midas":   # names the exact file and where to get it
        assert "dpt_hybrid-midas-501f0c75.pt" in r.json()["detail"] and "lllyasviel/Annotators" in r.json()["detail"]


def test_txt2img_units_strings_ints_weight_zero_and_disabled(client):
    plain = generate(client)
    named = generate(client, units=[unit()])
    numbered = generate(client, units=[unit(resize_mode=1, control_mode=0),
                                       unit(enabled=False, model="not even checked", image="garbage")])
    zero = generate(client, units=[unit(weight=0)])
    assert np.array_equal(pixels(named), pixels(numbered))
    assert not np.array_equal(pixels(named), pixels(plain))
    assert np.array_equal(pixels(zero), pixels(plain))
    text = named["info"]["infotexts"][0]
    assert f'ControlNet 0: "Module: canny, Model: {CN} [' in text and "Resize Mode: Crop and Resize" in text
    assert "ControlNet 1" not in numbered["info"]["infotexts"][0]


def test_img2img_unit_uses_the_init_image_and_inpainting_checkpoint_is_reported(client):
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((20, 20, 44, 44), fill=255)
    out = generate(client, "/sdapi/v1/img2img", units=[unit(image=None)], init_images=[b64(rectangle())],
                   denoising_strength=0.8)
    assert f'ControlNet 0: "Module: canny, Model: {CN} [' in out["info"]["infotexts"][0]
    assert out["info"]["is_using_inpainting_conditioning"] is False
    out = generate(client, "/sdapi/v1/img2img", init_images=[b64(rectangle())], mask=b64(mask), steps=2,
                   override_settings={"sd_model_checkpoint": "tiny-sd1-inpainting"})
    assert out["info"]["sd_model_name"] == "tiny-sd1-inpainting"
    assert out["info"]["is_using_inpainting_conditioning"] is True


@pytest.mark.parametrize("change,status,field", [
    ({"model": "no_such_controlnet"}, 404, "model"),
    ({"model": "None"}, 422, "model"),
    ({"module": "no_such_module"}, 422, "module"),
    ({"resize_mode": "Sideways"}, 422, "resize_mode"),
    ({"control_mode": 7}, 422, "control_mode"),
    ({"weight": "heavy"}, 422, "weight"),
    ({"image": "%%% not base64"}, 422, "image"),
    ({"guidance_start": 0.9, "guidance_end": 0.1}, 422, "guidance_start"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_unit_names_its_field(client, change, status, field):
    body = tiny_body()
    body["alwayson_scripts"] = {"ControlNet": {"args": [unit(enabled=False), unit(**change)]}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == f"alwayson_scripts.controlnet.args[1].{field}"


def test_webuiapi_controlnet_unit(base_url):
    webuiapi = pytest.importorskip("webuiapi")
    host, port = base_url.rsplit("//", 1)[1].split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)
    cn_unit = webuiapi.ControlNetUnit(image=rectangle(), module="canny", model=f"{CN}", processor_res=64,
                                      threshold_a=100, threshold_b=200, control_mode=2)
    # a fresh alwayson_scripts: webuiapi adds the units to its shared default dict otherwise
    result = api.txt2img(prompt="a box", seed=5, width=64, height=64, controlnet_units=[cn_unit],
                         alwayson_scripts={})
    assert result.image.size == (64, 64)
    text = result.info["infotexts"][0]
    assert f'ControlNet 0: "Module: canny, Model: {CN} [' in text
    assert "Control Mode: ControlNet is more important" in text and "Resize Mode: Resize and Fill" in text
