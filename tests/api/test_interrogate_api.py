"""POST /sdapi/v1/interrogate: a BLIP caption from models/captioners (a tiny random BLIP built here)."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.api.conftest import make_app, serve

from tests.tinymodels import write_tiny_blip


@pytest.fixture(scope="module")
def blip_server(tmp_path_factory):
    from studio.app import Studio
    from studio.settings import Settings

    tmp = tmp_path_factory.mktemp("interrogate")
    models = tmp / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    studio = Studio(Settings(models_dir=str(models), data_dir=str(tmp / "data"), outdir=str(tmp / "out")))
    with serve(make_app(studio)) as url:
        yield url, models, tmp
    studio.close()


def _b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_interrogate_without_and_with_a_captioner(blip_server):
    url, models, tmp = blip_server
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "clip"})
        assert r.status_code == 404, r.text
        err = r.json()
        assert err["field"] == "model" and "captioners" in err["detail"]
        assert "blip-image-captioning-base" in err["detail"]

        r = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "no-such-model"})
        assert r.status_code == 422 and r.json()["field"] == "model"
        r = c.post("/sdapi/v1/interrogate", json={"image": "not an image", "model": "clip"})
        assert r.status_code == 422 and r.json()["field"] == "image"

        write_tiny_blip(models / "captioners" / "tiny-blip", tmp)
        r = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "clip"})
        assert r.status_code == 200, r.text
        text = r.json()["caption"]
        assert text.split() and set(text.split()) == {"red"}
        again = c.post("/sdapi/v1/interrogate", json={"image": _b64("red")}).json()["caption"]
        assert again == text                                  # greedy decoding: the same caption
        by_folder = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "tiny-blip"})
        assert by_folder.status_code == 200 and by_folder.json()["caption"] == text
        r = c.post("/sdapi/v1/interrogate", json={"image": _b64("red"), "model": "deepdanbooru"})
        assert r.status_code == 404 and "model 'clip'" in r.json()["detail"]
