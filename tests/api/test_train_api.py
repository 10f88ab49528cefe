"""/sdapi/v1/train/*: a tiny LoRA run started over REST shows up in /sdapi/v1/loras; bad configs name the field."""
from __future__ import annotations

import time

import pytest

from tests.api.conftest import make_studio
from tests.training.conftest import write_dataset


@pytest.fixture(scope="module")
def api_studio(tmp_path_factory):
    """Own models folder with one tiny SD1 (training writes into models/Lora)."""
    from tests import tinymodels
    tmp = tmp_path_factory.mktemp("train-api")
    ckpt = tmp / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=0), ckpt / "tiny-sd1.safetensors")
    studio = make_studio(tmp / "models", tmp / "data", tmp / "outputs")
    yield studio
    studio.training.stop()
    studio.training.wait(60)
    studio.queue.interrupt()
    studio.close()


@pytest.fixture(scope="module")
def dataset(api_studio):
    """In the studio's datasets folder: requests may only name paths inside the studio's folders."""
    return write_dataset(api_studio.training.datasets_dir() / "shapes", 4)


def tiny_config(dataset, **kw) -> dict:
    body = {"base_model": "tiny-sd1", "dataset_dir": str(dataset), "resolution": 64, "min_image_side": 32,
            "rank": 2, "alpha": 2, "learning_rate": 1e-3, "max_steps": 4, "batch_size": 2,
            "output_name": "api_shapes", "sample_at_start": False}
    body.update(kw)
    return body


@pytest.mark.parametrize("change, field", [
    ({"max_steps": -1}, "training.max_steps"),
    ({"network": {"rank": "eight"}}, "network.rank"),          # sectioned like the TOML file
    ({"method": "dora"}, "method.method"),
    ({"dataset_dir": "/no/such/folder"}, "dataset.dataset_dir"),
    ({"output_name": "../escape"}, "output.output_name"),
])
def test_bad_config_is_422_naming_the_field(client, dataset, change, field):
    body = tiny_config(dataset)
    for key in change.get("network", {}):
        body.pop(key, None)
    body.update(change)
    r = client.post("/sdapi/v1/train/start", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert client.get("/sdapi/v1/train/status").json()["current"] is None


def test_unknown_checkpoint_names_base_model(client, dataset):
    r = client.post("/sdapi/v1/train/start", json=tiny_config(dataset, base_model="no-such-model"))
    assert r.status_code in (404, 422), r.text
    assert r.json()["field"] == "model.base_model"


def test_tiny_run_appears_in_loras(client, dataset, api_studio):
    r = client.post("/sdapi/v1/train/start", json=tiny_config(dataset))
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["output"].endswith("api_shapes.safetensors") and job["config"].endswith("run.toml")
    seen_steps = set()
    deadline = time.monotonic() + 300
    while True:
        status = client.get("/sdapi/v1/train/status").json()
        cur = status["current"]
        if cur is not None:
            assert cur["id"] == job["id"]
            seen_steps.add(cur.get("step") or 0)
        elif status.get("last") and status["last"]["id"] == job["id"]:
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    last = status["last"]
    assert last["state"] == "done", last
    assert last["step"] == 4 and [s for s, _ in last["losses"]] == [1, 2, 3, 4]
    assert any(p.endswith("api_shapes.safetensors") for p in last["outputs"])
    names = [lora["name"] for lora in client.get("/sdapi/v1/loras").json()]
    assert "api_shapes" in names                     # the service refreshed the list after the run
    history = client.get("/sdapi/v1/train/history").json()
    assert history[0]["id"] == job["id"] and history[0]["state"] == "done"
    assert client.post("/sdapi/v1/train/stop").json() == {"stopped": False}


def test_start_of_a_run_another_trainer_holds_is_409(client, dataset, api_studio):
    """A trainer a killed studio left behind still holds its run: a new start / resume is refused, clearly."""
    from tests.training.test_lifecycle import hold_lock
    run_dir = api_studio.training.runs_dir / "api_locked"
    holder = hold_lock(run_dir)
    try:
        r = client.post("/sdapi/v1/train/start", json=tiny_config(dataset, output_name="api_locked"))
        assert r.status_code == 409, r.text
        body = r.json()
        assert body["field"] == "output.output_name" and f"process {holder.pid}" in r.text, body
        assert client.get("/sdapi/v1/train/status").json()["current"] is None
    finally:
        holder.kill()
        holder.wait()
