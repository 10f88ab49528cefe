"""POST /sdapi/v1/merge/checkpoints and /sdapi/v1/merge/lora against a live server (own copy of the models)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.api.conftest import make_studio


@pytest.fixture(scope="module")
def api_studio(model_store, tmp_path_factory):
    """Overrides the shared (read-only) studio: these tests write into the model folders."""
    tmp = tmp_path_factory.mktemp("merge-api")
    shutil.copytree(model_store, tmp / "models")
    studio = make_studio(tmp / "models", tmp / "data", tmp / "outputs")
    yield studio
    studio.queue.interrupt()
    studio.close()


def test_merge_two_checkpoints_lists_the_result(client, api_studio):
    r = client.post("/sdapi/v1/merge/checkpoints", json={
        "a": "tiny-sd1.safetensors", "b": "tiny-sd1-b", "multiplier": 0.3, "output_name": "api-merged",
        "block_weights": "GRAD_V", "te_multiplier": 0.2})
    assert r.status_code == 200, r.text
    body = r.json()
    path = Path(body["path"])
    assert path.name == "api-merged.safetensors" and path.is_file()
    assert path.parent.resolve() == api_studio.settings.ckpt_path.resolve()
    assert body["title"].startswith("api-merged.safetensors [")
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert body["title"] in titles
    # the same name again is refused, naming the field, unless overwrite is set
    again = client.post("/sdapi/v1/merge/checkpoints",
                        json={"a": "tiny-sd1", "b": "tiny-sd1-b", "output_name": "api-merged"})
    assert again.status_code == 422 and again.json()["field"] == "output_name"


def test_family_mismatch_names_both_models(client):
    r = client.post("/sdapi/v1/merge/checkpoints", json={"a": "tiny-sd1", "b": "tiny-sd2", "output_name": "x"})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["field"] == "b"
    assert "tiny-sd1" in err["detail"] and "tiny-sd2" in err["detail"]


@pytest.mark.parametrize("weights", [[0.5] * 3, "NOT_A_PRESET", "1,2,x"])
def test_bad_block_weights_are_422(client, weights):
    r = client.post("/sdapi/v1/merge/checkpoints",
                    json={"a": "tiny-sd1", "b": "tiny-sd1-b", "block_weights": weights})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "block_weights"


def test_unknown_model_and_missing_b(client):
    r = client.post("/sdapi/v1/merge/checkpoints", json={"a": "nope", "b": "tiny-sd1-b"})
    assert r.status_code == 404 and r.json()["field"] == "a"
    r = client.post("/sdapi/v1/merge/checkpoints", json={"a": "tiny-sd1"})
    assert r.status_code == 422 and r.json()["field"] == "b"


def test_lora_extract_then_resize_report_energy(client):
    r = client.post("/sdapi/v1/merge/lora", json={"action": "extract", "tuned": "tiny-sd1-b", "base": "tiny-sd1",
                                                  "output_name": "api-extracted", "rank": 4})
    assert r.status_code == 200, r.text
    assert r.json()["layers"] and 0 < r.json()["energy"] <= 1
    assert "api-extracted" in [x["name"] for x in client.get("/sdapi/v1/loras").json()]
    r = client.post("/sdapi/v1/merge/lora", json={"action": "resize", "lora": "api-extracted", "rank": 2,
                                                  "output_name": "api-resized"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {s["new_rank"] for s in body["layers"].values()} <= {1, 2}
    assert 0 < body["energy"] <= 1 and Path(body["path"]).name == "api-resized.safetensors"
    r = client.post("/sdapi/v1/merge/lora", json={
        "action": "merge", "output_name": "api-merged-lora",
        "loras": [{"name": "api-extracted", "weight": 0.5}, {"name": "api-resized", "te": 0.2, "unet": 1.0}]})
    assert r.status_code == 200, r.text
    assert {s["new_rank"] for s in r.json()["layers"].values()} <= {5, 6}  # concat: 4 + 2 (fewer if rank-limited)
    r = client.post("/sdapi/v1/merge/lora", json={"action": "bake", "checkpoint": "tiny-sd1",
                                                  "output_name": "api-baked",
                                                  "loras": [{"name": "api-extracted", "weight": 0.7}]})
    assert r.status_code == 200, r.text
    assert r.json()["title"] in [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    # validation names the field of the chosen action
    r = client.post("/sdapi/v1/merge/lora", json={"action": "resize", "lora": "api-extracted", "rank": 0,
                                                  "output_name": "y"})
    assert r.status_code == 422 and r.json()["field"].endswith("rank")
