"""randn_source over the API: stored and shown by /options, used by txt2img, written as RNG in the infotext."""
from __future__ import annotations

from tests.api.conftest import tiny_body


def test_randn_source_option(client):
    assert client.get("/sdapi/v1/options").json()["randn_source"] == "CPU"     # the studio's default setting
    r = client.post("/sdapi/v1/options", json={"randn_source": "NV"})
    assert r.status_code == 422 and r.json()["field"] == "randn_source" and "NV" in r.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"randn_source": "gpu"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["randn_source"] == "GPU"
    r = client.post("/sdapi/v1/txt2img", json=tiny_body())
    assert r.status_code == 200, r.text
    info = r.json()["info"]
    assert "RNG: CPU" in info   # GPU = the generation device, which is the CPU here: the noise came from the CPU
    r = client.post("/sdapi/v1/txt2img", json=tiny_body(override_settings={"randn_source": "NV"}))
    assert r.status_code == 422 and r.json()["field"] == "override_settings.randn_source"
    client.post("/sdapi/v1/options", json={"randn_source": "CPU"})
