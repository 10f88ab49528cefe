"""Bad input answers 4xx naming the field (issue 14): prompts, JSON bodies, options, embeddings, checkpoints,
ControlNet detect, merge names. A 500 "Internal error" is always a bug."""
from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image, ImageDraw

from .conftest import make_app, serve, tiny_body


def _error(r: httpx.Response, field: str | None, status: int = 422) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and "Internal error" not in body["detail"]
    return body


# ---- prompts ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,field", [
    ({"prompt": "x" * 2_000_000}, "prompt"),
    ({"prompt": "a BREAK " * 1000}, "prompt"),
    ({"negative_prompt": "(" * 5000 + "cat" + ")" * 5000}, "negative_prompt"),
    ({"enable_hr": True, "hr_prompt": "y" * 20000}, "hr_prompt"),
], ids=["2MB", "1000-BREAKs", "deep-negative", "hr_prompt"])
def test_oversized_prompts_are_refused_before_queueing(client, api_studio, changes, field):
    before = len(api_studio.queue.history())
    start = time.monotonic()
    body = _error(client.post("/sdapi/v1/txt2img", json=tiny_body(**changes)), field)
    assert "limit" in body["detail"]
    assert len(api_studio.queue.history()) == before and not api_studio.queue.busy   # never took a queue place
    assert time.monotonic() - start < 60   # was minutes (2 MB prompt) before


def test_lone_surrogate_in_prompt(client):
    raw = json.dumps(tiny_body(prompt="PLACEHOLDER")).replace("PLACEHOLDER", "\\ud800 x")
    r = client.post("/sdapi/v1/txt2img", content=raw.encode(), headers={"content-type": "application/json"})
    body = _error(r, "prompt")
    assert "surrogate" in body["detail"]


# ---- JSON bodies and options ---------------------------------------------------------------------------------------
def test_deeply_nested_json_body_is_a_client_error(client):
    deep = '{"a": ' * 1000 + "1" + "}" * 1000
    r = client.post("/sdapi/v1/options", content=deep.encode(), headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert "Internal error" not in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", content=b"[" * 100000, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize("payload,field", [
    ({"no_such_option_key": 1}, "no_such_option_key"),
    ({"samples_format": "png", "my_tool_key": [1]}, "my_tool_key"),
    ({"samples_filename_pattern": "x" * 100_000}, "samples_filename_pattern"),
    ({"quicksettings_list": "not a list"}, "quicksettings_list"),
    ({"jpeg_quality": "high"}, "jpeg_quality"),
    ({"eta_ddim": True}, "eta_ddim"),
    ({"font": "\ud800"}, "font"),
], ids=["unknown", "unknown-among-known", "oversized", "list", "int", "float", "surrogate"])
def test_options_are_validated(client, api_studio, payload, field):
    raw = json.dumps(payload)   # ASCII JSON: lone surrogates go as \ud800 escapes
    r = client.post("/sdapi/v1/options", content=raw.encode(), headers={"content-type": "application/json"})
    _error(r, field)
    stored = client.get("/sdapi/v1/options").json()
    assert field not in stored or stored[field] != payload[field]


def test_a1111_option_keys_are_accepted(client):
    opts = client.get("/sdapi/v1/options").json()
    # what GET returns can be posted back, and the keys A1111 clients commonly send are known
    echo = {k: v for k, v in opts.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")}
    assert client.post("/sdapi/v1/options", json=echo).status_code == 200
    common = {"samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 31337,
              "jpeg_quality": 90.0, "eta_ancestral": 1, "quicksettings_list": ["sd_model_checkpoint"],
              "sd_checkpoint_hash": "", "upscaler_for_img2img": None}
    assert client.post("/sdapi/v1/options", json=common).status_code == 200
    stored = client.get("/sdapi/v1/options").json()
    assert stored["eta_noise_seed_delta"] == 31337 and stored["jpeg_quality"] == 90


# ---- embeddings ----------------------------------------------------------------------------------------------------
def test_unreadable_embedding_is_listed_with_its_error(studio):
    import torch
    from safetensors.torch import save_file

    folder = studio.settings.embeddings_path
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.zeros(2, 32)}, str(folder / "good.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"\xff" * 64)           # not a safetensors file
    torch.save({"clip_l": "not a tensor"}, str(folder / "odd.pt"))      # a dict without any vectors
    studio.embeddings.refresh()
    with serve(make_app(studio)) as url, httpx.Client(base_url=url, timeout=120) as c:
        r = c.get("/sdapi/v1/embeddings")
        assert r.status_code == 200, r.text
        body = r.json()
        names = {**body["loaded"], **body["skipped"]}
        assert {"good", "broken", "odd"} <= set(names)
        for bad in ("broken", "odd"):
            assert body["skipped"][bad]["vectors"] == 0 and body["skipped"][bad]["error"], body["skipped"][bad]
        assert "broken.safetensors" in body["skipped"]["broken"]["error"]
    from webui.extra_networks import CardRenderer   # the UI's panel shows the reason on the card

    html = CardRenderer(studio).embeddings()
    assert html.count("⚠ unreadable") == 2 and "broken.safetensors is not a valid .safetensors file" in html


# ---- checkpoints whose modules cannot be built --------------------------------------------------------------------
def test_unbuildable_checkpoint_names_file_and_layout(studio):
    """A UNet whose first level is 36 channels wide: the config derivation reads it, but GroupNorm(32) cannot
    split 36 channels, so diffusers refuses to build the module."""
    import torch
    from safetensors.torch import load_file, save_file

    src = studio.settings.ckpt_path / "tiny-sd1.safetensors"
    sd = load_file(str(src))
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.1.0.out_layers.3.weight"):
        shape = list(sd[key].shape)
        shape[0] = 36
        sd[key] = torch.zeros(shape)
    save_file(sd, str(studio.settings.ckpt_path / "odd-unet.safetensors"))
    studio.registry.refresh()
    with serve(make_app(studio)) as url, httpx.Client(base_url=url, timeout=300) as c:
        r = c.post("/sdapi/v1/txt2img", json=tiny_body(override_settings={"sd_model_checkpoint": "odd-unet"}))
        assert 400 <= r.status_code < 500, r.text
        detail = r.json()["detail"]
        assert "odd-unet.safetensors" in detail and "block_out_channels [36" in detail, detail
        assert "unsupported" in detail and "Internal error" not in detail


# ---- ControlNet detect ---------------------------------------------------------------------------------------------
def _png_b64() -> str:
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), outline="white", width=3)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("res", [0, 10, 100_000, -5])
def test_detect_checks_processor_res(client, res):
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_processor_res": res,
                                                "controlnet_input_images": [_png_b64()]})
    body = _error(r, "controlnet_processor_res")
    assert "64" in body["detail"] and "2048" in body["detail"]


def test_detect_accepts_webuiapi_image_key(client):
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_processor_res": 64,
                                                "controlnet_images": [_png_b64()]})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1


# ---- merge output names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,words", [("m" * 300, "limit"), ("merged \ud800", "surrogate")],
                         ids=["long", "surrogate"])
def test_bad_merge_output_name(client, name, words):
    raw = json.dumps({"a": "tiny-sd1", "b": "tiny-sd1-b", "output_name": name})
    r = client.post("/sdapi/v1/merge/checkpoints", content=raw.encode(), headers={"content-type": "application/json"})
    body = _error(r, "output_name")
    assert words in body["detail"]
