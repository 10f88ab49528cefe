"""POST /sdapi/v1/img2img (img2img and inpaint) and txt2img's hires fields, over HTTP on the tiny models."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from .conftest import tiny_body


def b64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def picture(w: int = 64, h: int = 64) -> Image.Image:
    img = Image.new("RGB", (w, h), (40, 120, 200))
    d = ImageDraw.Draw(img)
    d.rectangle((w // 4, h // 4, w // 2, h // 2), fill=(230, 200, 20))
    d.ellipse((w // 2, h // 2, w - 4, h - 4), fill=(200, 30, 60))
    return img


def box_mask(box=(24, 24, 40, 40)) -> Image.Image:
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle(box, fill=255)
    return m


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def post(client, path: str = "/sdapi/v1/img2img", **kw) -> dict:
    body = tiny_body(steps=4, init_images=[b64(picture())]) if path.endswith("img2img") else tiny_body()
    body.update(kw)
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    out["info"] = json.loads(out["info"])
    return out


def test_img2img_size_infotext_and_parameters(client):
    out = post(client, init_images=["data:image/png;base64," + b64(picture(80, 48))], denoising_strength=0.5,
               image_cfg_scale=1.5, initial_noise_multiplier=1)
    img, info = decode(out["images"][0]), out["info"]
    assert img.size == (64, 64)
    assert "Denoising strength: 0.5" in info["infotexts"][0] and info["denoising_strength"] == 0.5
    assert info["is_using_inpainting_conditioning"] is False
    assert any("image_cfg_scale" in w for w in info["warnings"])
    params = out["parameters"]   # A1111 echoes the images only with include_init_images
    assert params["init_images"] is None and params["mask"] is None and params["inpaint_full_res"] is True
    assert (params["inpainting_fill"], params["inpaint_full_res_padding"], params["resize_mode"]) == (0, 0, 0)
    sent = [b64(picture())]
    out = post(client, init_images=sent, include_init_images=True, denoising_strength=0.3, steps=2)
    assert out["parameters"]["init_images"] == sent and len(out["images"]) == 1


@pytest.mark.parametrize("full_res", [True, False])
def test_inpaint_changes_only_the_masked_area(client, full_res):
    out = post(client, mask=b64(box_mask()), mask_blur=4, inpainting_fill=1, denoising_strength=0.9,
               inpaint_full_res=full_res, inpaint_full_res_padding=4)
    result, src = arr(decode(out["images"][0])), arr(picture())
    outside = np.asarray(box_mask().filter(ImageFilter.GaussianBlur(4))) == 0
    assert np.array_equal(result[outside], src[outside])
    inside = np.asarray(box_mask()) == 255
    assert np.abs(result[inside] - src[inside]).mean() > 5
    text = out["info"]["infotexts"][0]
    assert "Mask blur: 4" in text and "Masked content: original" in text
    assert ("Inpaint area: Only masked" in text) is full_res


def test_every_img2img_field_reaches_the_request(client, api_studio):
    out = post(client, mask="data:image/png;base64," + b64(box_mask()), mask_blur_x=2, mask_blur_y=2,
               inpainting_fill=2, inpainting_mask_invert=1, inpaint_full_res=False, inpaint_full_res_padding=16,
               resize_mode=1, denoising_strength=0.6, steps=2, batch_size=2, force_task_id="img2img-fields",
               alwayson_scripts={"ADetailer": {"args": []}}, override_settings={"CLIP_stop_at_last_layers": 2})
    request = api_studio.queue.get("img2img-fields").result.request
    assert request.mode == "inpaint" and request.init_images[0].size == (64, 64) and request.mask.size == (64, 64)
    assert (request.mask_blur, request.inpainting_fill, request.inpainting_mask_invert) == (2, 2, 1)
    assert (request.inpaint_full_res, request.inpaint_full_res_padding, request.resize_mode) == (False, 16, 1)
    assert (request.denoising_strength, request.clip_skip, request.batch_size) == (0.6, 2, 2)
    text = out["info"]["infotexts"][0]
    assert "Masked content: latent noise" in text and "Mask mode: Inpaint not masked" in text
    assert "Mask blur: 2" in text and "Clip skip: 2" in text and len(out["images"]) == 2
    assert any("ADetailer" in w for w in out["info"]["warnings"])


BIG = Image.new("1", (4200, 4200))   # 17.6 MP: over the 16.7 MP cap, yet a few KB as PNG


@pytest.mark.parametrize("change,field", [
    ({"init_images": ["%%% not base64 %%%"]}, "init_images"),
    ({"init_images": [base64.b64encode(b"just some text").decode()]}, "init_images"),
    ({"init_images": [b64(BIG)]}, "init_images"),
    ({"init_images": ["http://example.com/a.png"]}, "init_images"),
    ({"init_images": []}, "init_images"),
    ({"init_images": None}, "init_images"),
    ({"mask": "not base64!"}, "mask"),
    ({"mask": base64.b64encode(b"GIF89a broken").decode()}, "mask"),
    ({"mask": b64(BIG)}, "mask"),
    ({"resize_mode": 7}, "resize_mode"),
    ({"inpainting_fill": 9, "mask": b64(box_mask())}, "inpainting_fill"),
    ({"denoising_strength": 1.5}, "denoising_strength"),
    ({"mask_blur": 500, "mask": b64(box_mask())}, "mask_blur"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_img2img_body_is_422_naming_the_field(client, change, field):
    body = tiny_body(init_images=[b64(picture())])
    body.update(change)
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["detail"]


def test_hires_fields_map_onto_the_request(client, api_studio):
    out = post(client, "/sdapi/v1/txt2img", enable_hr=True, hr_resize_x=96, hr_resize_y=128, hr_upscaler="Latent",
               hr_second_pass_steps=2, hr_sampler_name="Euler a", hr_prompt="a blue house",
               hr_negative_prompt="fog", force_task_id="hires-fields")
    request = api_studio.queue.get("hires-fields").result.request
    assert (request.enable_hr, request.hr_resize_x, request.hr_resize_y) == (True, 96, 128)
    assert (request.hr_second_pass_steps, request.hr_sampler_name) == (2, "Euler a")
    assert (request.hr_prompt, request.hr_negative_prompt) == ("a blue house", "fog")
    assert request.hr_denoising_strength == 0.7          # A1111's default when denoising_strength is not sent
    assert decode(out["images"][0]).size == (96, 128)
    text = out["info"]["infotexts"][0]
    assert "Hires resize: 96x128" in text and "Hires steps: 2" in text and "Denoising strength: 0.7" in text
    assert out["info"]["denoising_strength"] == 0.7
    out = post(client, "/sdapi/v1/txt2img", enable_hr=True, hr_scale=2, denoising_strength=0.5, steps=2)
    assert decode(out["images"][0]).size == (128, 128) and "Hires upscale: 2" in out["info"]["infotexts"][0]


def test_openapi_has_img2img_and_controlnet(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert "ImageToImageResponse" in json.dumps(paths["/sdapi/v1/img2img"]["post"]["responses"]["200"])
    img2img = spec["components"]["schemas"]["Img2ImgRequest"]["properties"]
    assert img2img["denoising_strength"]["default"] == 0.75 and img2img["inpaint_full_res"]["default"] is True
    assert img2img["inpainting_fill"]["default"] == 0 and img2img["inpaint_full_res_padding"]["default"] == 0
    assert "enable_hr" not in img2img and "enable_hr" in spec["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    for path in ("/controlnet/version", "/controlnet/model_list", "/controlnet/module_list", "/controlnet/settings",
                 "/controlnet/detect"):
        assert path in paths
