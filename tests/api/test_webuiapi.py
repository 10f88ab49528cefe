"""The `webuiapi` package from PyPI (a real A1111 client) against the studio, unchanged."""
from __future__ import annotations

import threading
import time

import pytest

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture()
def api(base_url):
    host, port = base_url.rsplit("//", 1)[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)


def test_webuiapi_txt2img(api):
    result = api.txt2img(prompt="a lighthouse", negative_prompt="fog", seed=42, width=64, height=64,
                         batch_size=2, cfg_scale=6)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [42, 43] and result.info["sampler_name"] == "Euler a"
    assert result.parameters["prompt"] == "a lighthouse"
    assert "Seed: 42" in result.images[0].info["parameters"]


def test_webuiapi_models_and_set_model(api):
    deadline = time.monotonic() + 30
    while True:  # hashes are filled in by a background thread; titles carry "[hash]" once it is done (as A1111's)
        models = api.get_sd_models()
        if all(m["hash"] for m in models) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    titles = sorted(m["title"] for m in models)
    assert any(t.startswith("tiny-sd1-b.safetensors [") for t in titles)
    assert api.util_get_model_names() == titles
    try:
        api.util_set_model("tiny-sd1-b.safetensors")   # find_closest matching against titles, then POST /options
        assert api.util_get_current_model().startswith("tiny-sd1-b.safetensors [")
        result = api.txt2img(prompt="x", seed=1, width=64, height=64)
        assert result.info["sd_model_name"] == "tiny-sd1-b"
    finally:
        api.util_set_model("tiny-sd1.safetensors")
    assert api.util_get_current_model().startswith("tiny-sd1.safetensors [")


def test_webuiapi_progress_and_interrupt(api):
    assert api.get_progress()["state"]["job_count"] == 0
    done: dict = {}

    def run():
        done["result"] = api.txt2img(prompt="long", seed=3, steps=150, n_iter=3, width=64, height=64)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    progress = None
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] > 0:
            break
        time.sleep(0.02)
    assert progress["state"]["sampling_step"] > 0 and progress["progress"] > 0
    assert api.interrupt() == {}
    thread.join(60)
    assert not thread.is_alive()
    assert done["result"].info["interrupted"] is True
    api.util_wait_for_ready(check_interval=0.05)   # returns once progress is 0 and no job is counted


def test_webuiapi_img2img_and_inpaint(api):
    from PIL import Image, ImageDraw

    init = Image.new("RGB", (64, 64), (40, 120, 200))
    ImageDraw.Draw(init).rectangle((16, 16, 32, 32), fill=(230, 200, 20))
    result = api.img2img(images=[init], prompt="a yellow square", denoising_strength=0.5, seed=7, width=64,
                         height=64)
    assert result.image.size == (64, 64) and result.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 24, 24), fill=255)
    result = api.img2img(images=[init], mask_image=mask, prompt="x", denoising_strength=0.9, seed=7, width=64,
                         height=64, inpainting_fill=1)
    out, src = result.image.convert("RGB"), init
    assert out.getpixel((60, 60)) == src.getpixel((60, 60))           # far from the mask: untouched
    assert "Masked content: original" in result.info["infotexts"][0]
