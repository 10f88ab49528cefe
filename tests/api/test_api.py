"""The A1111-compatible REST API, driven over HTTP against a real uvicorn server and the tiny models."""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from studio.infotext import parse_infotext, read_infotext

from .conftest import make_app, serve, tiny_body

INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning",
    "version",
}
STATE_KEYS = {"skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp", "job_no",
              "sampling_step", "sampling_steps"}


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def txt2img(client: httpx.Client, **kw) -> dict:
    r = client.post("/sdapi/v1/txt2img", json=tiny_body(**kw))
    assert r.status_code == 200, r.text
    out = r.json()
    out["info"] = json.loads(out["info"])
    return out


# ---- generation ----------------------------------------------------------------------------------------------
def test_txt2img_pngs_carry_infotext_that_parses_back(client):
    out = txt2img(client, batch_size=2, seed=4321)
    assert set(out) == {"images", "parameters", "info"}
    info = out["info"]
    assert INFO_KEYS <= set(info)
    assert len(out["images"]) == 2 and len(info["infotexts"]) == 2
    for i, b64 in enumerate(out["images"]):
        img = decode(b64)
        assert img.format == "PNG" and img.size == (64, 64)
        text = read_infotext(img)
        assert text == info["infotexts"][i]
        parsed = parse_infotext(text)
        assert parsed["Prompt"] == "a red house" and parsed["Negative prompt"] == "blurry"
        assert parsed["Seed"] == str(4321 + i) and parsed["Steps"] == "3"
        assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "64")
        assert parsed["Sampler"] == "Euler" and parsed["Model hash"] == info["sd_model_hash"]
    assert info["sd_model_name"] == "tiny-sd1" and re.fullmatch(r"[0-9a-f]{10}", info["sd_model_hash"])
    assert info["restore_faces"] is False and info["face_restoration_model"] is None
    assert info["seed_resize_from_w"] == -1 and info["index_of_first_image"] == 0 and info["styles"] == []
    assert info["is_using_inpainting_conditioning"] is False and re.fullmatch(r"\d{14}", info["job_timestamp"])
    # parameters echoes the whole request with A1111's defaults
    params = out["parameters"]
    assert params["send_images"] is True and params["save_images"] is False and params["sampler_index"] == "Euler"


def test_seeds_and_all_seeds(client):
    info = txt2img(client, batch_size=2, n_iter=2, seed=100, subseed=7)["info"]
    assert info["seed"] == 100 and info["all_seeds"] == [100, 101, 102, 103]
    assert info["subseed"] == 7 and info["all_subseeds"] == [7, 8, 9, 10]
    assert [parse_infotext(t)["Seed"] for t in info["infotexts"]] == ["100", "101", "102", "103"]
    assert len(info["all_prompts"]) == 4 and info["batch_size"] == 2


def test_random_seed_is_reported(client):
    info = txt2img(client, seed=-1)["info"]
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]


def test_same_request_twice_gives_same_pixels(client):
    a = txt2img(client, seed=55)
    b = txt2img(client, seed=55)
    c = txt2img(client, seed=56)
    pa, pb, pc = (decode(x["images"][0]).convert("RGB").tobytes() for x in (a, b, c))
    assert pa == pb
    assert pa != pc


def test_send_images_false_and_defaults(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                               "send_images": False, "sampler_index": "Euler a"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["images"] == []
    info = json.loads(out["info"])
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 7.0


def test_a1111_only_fields_are_accepted(client):
    """A body as A1111 clients send it (hires, scripts, restore_faces, nulls, unknown keys) is not refused."""
    out = txt2img(client, styles=["none"], restore_faces=False, tiling=False, eta=1.0, s_noise=1, s_churn=0,
                  enable_hr=False, hr_scale=2, hr_upscaler="Latent", hr_checkpoint_name=None, hr_sampler_name=None,
                  hr_scheduler=None, denoising_strength=0.7, firstphase_width=0, seed_resize_from_h=0,
                  script_name=None, script_args=[], alwayson_scripts={}, do_not_save_grid=False,
                  override_settings_restore_afterwards=True, some_future_field=123, scheduler=None, n_iter=None)
    assert len(out["images"]) == 1
    assert out["parameters"]["some_future_field"] == 123


def test_hires_fix(client):
    info = txt2img(client, enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.6,
                   hr_second_pass_steps=2)
    assert decode(info["images"][0]).size == (128, 128)
    assert info["info"]["denoising_strength"] == 0.6 and "Hires upscale: 2" in info["info"]["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json=tiny_body(enable_hr=True, hr_upscaler="No Such Upscaler"))
    assert r.status_code == 422 and r.json()["field"] == "hr_upscaler"


def test_infotext_fills_unset_fields(client):
    text = "from the text\nNegative prompt: ugly\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: 777, Size: 64x64"
    r = client.post("/sdapi/v1/txt2img", json={"infotext": text, "prompt": "from the body"})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["prompt"] == "from the body"          # set in the body: kept
    assert info["negative_prompt"] == "ugly" and info["seed"] == 777 and info["steps"] == 2
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 5.0 and info["width"] == 64


# ---- models and options --------------------------------------------------------------------------------------
def test_sd_models_shape(client):
    deadline = time.monotonic() + 30
    while True:  # hashes are filled in by a background thread: null until it is done
        r = client.get("/sdapi/v1/sd-models")
        assert r.status_code == 200
        models = r.json()
        if all(m["hash"] for m in models) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    by_name = {m["model_name"]: m for m in models}
    for name in ("tiny-sd1", "tiny-sd1-b"):
        m = by_name[name]
        assert set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert re.fullmatch(r"[0-9a-f]{10}", m["hash"]) and m["sha256"].startswith(m["hash"])
        assert m["title"] == f"{name}.safetensors [{m['hash']}]"
        assert m["filename"].endswith(f"{name}.safetensors")
    assert "sub/tiny-sd1-c" in by_name


def test_options_switch_checkpoints(client, api_studio):
    models = {m["model_name"]: m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    try:
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models["tiny-sd1-b"]})
        assert r.status_code == 200, r.text
        opts = client.get("/sdapi/v1/options").json()
        assert opts["sd_model_checkpoint"] == models["tiny-sd1-b"]
        assert txt2img(client)["info"]["sd_model_name"] == "tiny-sd1-b"
        # by plain name too, and back
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1.safetensors"})
        assert r.status_code == 200, r.text
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["tiny-sd1"]
        assert txt2img(client)["info"]["sd_model_name"] == "tiny-sd1"
        loads = api_studio.manager.loads
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models["tiny-sd1-b"]})
        assert api_studio.manager.loads == loads, "switching back to a cached checkpoint must not re-read it"
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models["tiny-sd1"]})


def test_override_settings_checkpoint_is_temporary(client):
    models = {m["model_name"]: m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models["tiny-sd1"]})
    info = txt2img(client, override_settings={"sd_model_checkpoint": "tiny-sd1-b"})["info"]
    assert info["sd_model_name"] == "tiny-sd1-b"
    assert txt2img(client)["info"]["sd_model_name"] == "tiny-sd1"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["tiny-sd1"]


def test_clip_skip_option_and_other_a1111_keys_persist(client, api_studio):
    try:
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "hidden_tabs": [1, "a"]}
                           ).status_code == 200
        opts = client.get("/sdapi/v1/options").json()
        assert opts["CLIP_stop_at_last_layers"] == 2 and opts["hidden_tabs"] == [1, "a"]
        info = txt2img(client)["info"]
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
        # a per-request override wins
        assert txt2img(client, override_settings={"CLIP_stop_at_last_layers": 1})["info"]["clip_skip"] == 1
        saved = json.loads((api_studio.settings.settings_file.parent / "api-options.json").read_text())
        assert saved["hidden_tabs"] == [1, "a"] and "sd_model_checkpoint" not in saved
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


def test_lists(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert samplers[0]["name"] == "DPM++ 2M" and {"name", "aliases", "options"} == set(samplers[0])
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert "Karras" in [s["label"] for s in schedulers]
    vaes = client.get("/sdapi/v1/sd-vae").json()
    assert vaes == [{"model_name": "tiny-vae.safetensors", "filename": vaes[0]["filename"]}]
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}  # no embeddings folder
    mem = client.get("/sdapi/v1/memory").json()
    assert mem["ram"]["total"] > mem["ram"]["used"] > 0 and "cuda" in mem
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["ckpt_dir"].endswith("Stable-diffusion") and flags["api_auth"] is None
    for path in ("refresh-checkpoints", "refresh-vae"):
        assert client.post(f"/sdapi/v1/{path}").json() == {}


def test_unload_and_reload_checkpoint(client, api_studio):
    assert client.post("/sdapi/v1/unload-checkpoint").status_code == 200
    assert api_studio.manager.stats()["entries"] == []
    assert client.post("/sdapi/v1/reload-checkpoint").status_code == 200
    assert len(api_studio.manager.stats()["entries"]) == 1
    assert len(txt2img(client)["images"]) == 1


def test_vae_option(client):
    try:
        assert client.post("/sdapi/v1/options", json={"sd_vae": "tiny-vae.safetensors"}).status_code == 200
        info = txt2img(client)["info"]
        assert info["sd_vae_name"] == "tiny-vae.safetensors" and "VAE: tiny-vae.safetensors" in info["infotexts"][0]
    finally:
        client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})


# ---- png-info ------------------------------------------------------------------------------------------------
def test_png_info_round_trip(client):
    out = txt2img(client, seed=99, prompt="a (blue:1.2) cat, sunset")
    r = client.post("/sdapi/v1/png-info", json={"image": out["images"][0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == out["info"]["infotexts"][0]
    assert body["parameters"]["Seed"] == "99" and body["parameters"]["Prompt"] == "a (blue:1.2) cat, sunset"
    assert body["items"] == {}
    # line-wrapped base64 (as the base64 tool writes it) is fine
    wrapped = "\n".join(out["images"][0][i:i + 76] for i in range(0, len(out["images"][0]), 76))
    assert client.post("/sdapi/v1/png-info", json={"image": wrapped}).json()["info"] == body["info"]
    # a data: URL and a PNG without infotext
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(plain.getvalue()).decode()
    r = client.post("/sdapi/v1/png-info", json={"image": url})
    assert r.status_code == 200 and r.json()["info"] == ""


# ---- progress, interrupt, per-task progress ------------------------------------------------------------------
def test_progress_preview_and_interrupt(client, base_url, api_studio):
    result: dict = {}

    def run():
        with httpx.Client(base_url=base_url, timeout=120) as c:
            result["response"] = c.post("/sdapi/v1/txt2img",
                                        json=tiny_body(steps=150, n_iter=4, force_task_id="long-job"))

    started = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = client.get("/sdapi/v1/progress").json()
        if p["current_task"] == "long-job" and p["state"]["sampling_step"] >= 2 and p["current_image"]:
            seen = p
            break
        time.sleep(0.02)
    assert seen is not None, "the running job never showed up in /progress with a preview"
    assert set(seen["state"]) == STATE_KEYS
    assert seen["state"]["sampling_steps"] == 150 and seen["state"]["job_count"] == 4
    assert 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    preview = decode(seen["current_image"])
    assert preview.format == "PNG" and preview.size[0] > 0
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    # the same job by its task id, both ways
    task = client.get("/sdapi/v1/progress/long-job").json()
    assert task["status"] == "running" and task["task_id"] == "long-job" and task["queue_position"] == 0
    internal = client.post("/internal/progress", json={"id_task": "long-job", "id_live_preview": -1}).json()
    assert internal["active"] is True and internal["live_preview"].startswith("data:image/png;base64,")

    assert client.post("/sdapi/v1/interrupt").json() == {}
    thread.join(60)
    elapsed = time.monotonic() - started
    response = result["response"]
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and len(response.json()["images"]) <= 1
    task = client.get("/sdapi/v1/progress/long-job").json()
    assert task["status"] == "interrupted" and task["queue_position"] is None
    assert api_studio.queue.current() is None
    assert elapsed < 30
    # idle again
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_task"] is None


def test_unknown_task_progress(client):
    r = client.get("/sdapi/v1/progress/no-such-task")
    assert r.status_code == 404 and r.json()["field"] == "task_id"
    r = client.post("/internal/progress", json={"id_task": "no-such-task"})
    assert r.status_code == 200 and r.json()["completed"] is False and r.json()["active"] is False


def test_twenty_concurrent_requests_all_complete_in_order(base_url, api_studio):
    n = 20

    def one(i: int) -> httpx.Response:
        time.sleep(i * 0.005)   # staggered a little, but requests still overlap heavily
        with httpx.Client(base_url=base_url, timeout=120) as c:
            return c.post("/sdapi/v1/txt2img", json=tiny_body(seed=1000 + i, steps=2, force_task_id=f"conc-{i}"))

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        # the event loop stays free while they are queued: progress answers at once
        with httpx.Client(base_url=base_url, timeout=10) as c:
            t = time.monotonic()
            assert c.get("/sdapi/v1/progress").status_code == 200
            assert time.monotonic() - t < 1.0
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * n
    seeds = [json.loads(r.json()["info"])["all_seeds"] for r in responses]
    assert seeds == [[1000 + i] for i in range(n)], "a response carried another request's images"
    assert all(len(r.json()["images"]) == 1 for r in responses)
    jobs = [api_studio.queue.get(f"conc-{i}") for i in range(n)]
    assert all(j is not None and j.state == "done" for j in jobs)
    # FIFO: in the order the server queued them, each started after the previous one finished
    by_submission = sorted(jobs, key=lambda j: j.seq)
    for a, b in zip(by_submission, by_submission[1:]):
        assert a.finished <= b.started


# ---- validation: every bad body is a 422 (or 404 for an unknown name) naming the field, never a 500 ----------
BAD_TXT2IMG = [
    ({"steps": "many"}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"steps": 100000}, "steps"),
    ({"steps": 0}, "steps"),
    ({"width": 65}, "width"),
    ({"height": 100}, "height"),
    ({"width": 100000}, "width"),
    ({"height": 8}, "height"),
    ({"batch_size": 1000}, "batch_size"),
    ({"n_iter": 100000}, "n_iter"),
    ({"seed": "abc"}, "seed"),
    ({"seed": 2**40}, "seed"),
    ({"cfg_scale": "high"}, "cfg_scale"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"sampler_name": "No Such Sampler"}, "sampler_name"),
    ({"scheduler": "wobbly"}, "scheduler"),
    ({"send_images": "perhaps"}, "send_images"),
    ({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "override_settings.sd_model_checkpoint"),
    ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "override_settings.sd_model_checkpoint"),
    ({"override_settings": {"sd_model_checkpoint": "..\\x.safetensors"}}, "override_settings.sd_model_checkpoint"),
    ({"override_settings": {"sd_model_checkpoint": 5}}, "override_settings.sd_model_checkpoint"),
    ({"override_settings": {"CLIP_stop_at_last_layers": "x"}}, "override_settings.CLIP_stop_at_last_layers"),
    ({"override_settings": {"sd_vae": "../VAE/x.pt"}}, "override_settings.sd_vae"),
    ({"override_settings": "not a dict"}, "override_settings"),
    ({"force_task_id": "x" * 500}, "force_task_id"),
]


@pytest.mark.parametrize("change,field", BAD_TXT2IMG, ids=[f for _, f in BAD_TXT2IMG])
def test_bad_txt2img_body_is_422_naming_the_field(client, change, field):
    r = client.post("/sdapi/v1/txt2img", json=tiny_body(**change))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == field, body
    assert set(body) == {"error", "detail", "field", "errors"} and body["detail"]
    assert body["errors"][0]["loc"][0] == "body"


def test_unknown_checkpoint_is_404_listing_titles(client):
    r = client.post("/sdapi/v1/txt2img", json=tiny_body(override_settings={"sd_model_checkpoint": "nope"}))
    assert r.status_code == 404 and r.json()["field"] == "override_settings.sd_model_checkpoint"
    assert "tiny-sd1.safetensors [" in r.json()["detail"]
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert r.status_code == 404 and r.json()["field"] == "sd_model_checkpoint"
    assert "tiny-sd1-b.safetensors [" in r.json()["detail"]
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../Stable-diffusion/tiny-sd1.safetensors"})
    assert r.status_code == 422 and r.json()["field"] == "sd_model_checkpoint"
    # a Hugging Face repo id would be read from outside the model folders: refused without --allow-download
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "someone/some-model"})
    assert r.status_code == 404 and r.json()["field"] == "sd_model_checkpoint"


@pytest.mark.parametrize("path,payload,field", [
    ("/sdapi/v1/png-info", {"image": "%%% not base64 %%%"}, "image"),
    ("/sdapi/v1/png-info", {"image": base64.b64encode(b"hello, not an image").decode()}, "image"),
    ("/sdapi/v1/png-info", {"image": "http://example.com/a.png"}, "image"),
    ("/sdapi/v1/png-info", {"image": 12}, "image"),
    ("/sdapi/v1/png-info", {}, "image"),
    ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 99}, "CLIP_stop_at_last_layers"),
    ("/sdapi/v1/options", {"sd_vae": "nope.safetensors"}, "sd_vae"),
    ("/sdapi/v1/options", {"samples_save": "maybe"}, "samples_save"),
    ("/sdapi/v1/options", {"show_progress_every_n_steps": "often"}, "show_progress_every_n_steps"),
    ("/sdapi/v1/options", ["not", "an", "object"], "body"),
    ("/internal/progress", {"id_live_preview": "x"}, "id_live_preview"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_other_bad_bodies(client, path, payload, field):
    r = client.post(path, json=payload)
    assert r.status_code in (404, 422), r.text
    assert r.json()["field"] == field


def test_malformed_json_and_wrong_content(client):
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "RequestValidationError"
    r = client.post("/sdapi/v1/txt2img", json=[1, 2, 3])
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = client.get("/sdapi/v1/progress", params={"skip_current_image": "maybe"})
    assert r.status_code == 422 and r.json()["field"] == "skip_current_image"


def test_duplicate_task_id_while_queued_is_409(client, base_url, api_studio):
    def long():
        with httpx.Client(base_url=base_url, timeout=120) as c:
            return c.post("/sdapi/v1/txt2img", json=tiny_body(steps=150, force_task_id="dup"))

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(long)
        deadline = time.monotonic() + 30
        while api_studio.queue.get("dup") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/sdapi/v1/txt2img", json=tiny_body(force_task_id="dup"))
        assert r.status_code == 409 and r.json()["field"] == "force_task_id"
        client.post("/sdapi/v1/interrupt")
        assert fut.result().status_code == 200


# ---- auth and docs -------------------------------------------------------------------------------------------
def test_basic_auth(api_studio):
    app = make_app(api_studio, auth=[("alice", "s3cret"), ("bob", "pw:with:colons")])
    with serve(app) as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            for method, path in (("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/progress"),
                                 ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/options"),
                                 ("GET", "/sdapi/v1/progress/x"), ("POST", "/internal/progress")):
                r = c.request(method, path, json={})
                assert r.status_code == 401, (path, r.text)
                assert r.headers["www-authenticate"] == "Basic"
            assert c.get("/sdapi/v1/sd-models", auth=("alice", "wrong")).status_code == 401
            assert c.get("/sdapi/v1/sd-models", auth=("mallory", "s3cret")).status_code == 401
            assert c.get("/sdapi/v1/sd-models", auth=("alice", "s3cret")).status_code == 200
            assert c.get("/sdapi/v1/sd-models", auth=("bob", "pw:with:colons")).status_code == 200
            r = c.post("/sdapi/v1/txt2img", json=tiny_body(steps=2), auth=("alice", "s3cret"))
            assert r.status_code == 200 and len(r.json()["images"]) == 1
            # a bad body without credentials is refused for auth first, not validated
            assert c.post("/sdapi/v1/txt2img", json={"steps": "x"}).status_code == 401
            flags = c.get("/sdapi/v1/cmd-flags", auth=("alice", "s3cret")).json()
            assert flags["api_auth"] == "(set)" and "s3cret" not in json.dumps(flags)


def test_no_auth_when_not_configured(client):
    assert client.get("/sdapi/v1/sd-models").status_code == 200


def test_openapi_lists_every_route_with_schemas(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/sdapi/v1/txt2img", "post"): "TextToImageResponse",
        ("/sdapi/v1/progress", "get"): "ProgressResponse",
        ("/sdapi/v1/progress/{task_id}", "get"): "TaskProgressResponse",
        ("/sdapi/v1/options", "get"): "OptionsResponse",
        ("/sdapi/v1/sd-models", "get"): "SDModelItem",
        ("/sdapi/v1/png-info", "post"): "PNGInfoResponse",
        ("/sdapi/v1/memory", "get"): "MemoryResponse",
        ("/sdapi/v1/embeddings", "get"): "EmbeddingsResponse",
    }
    for (path, method), schema in expected.items():
        assert schema in json.dumps(paths[path][method]["responses"]["200"]), path
    for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/cmd-flags", "/sdapi/v1/samplers",
                 "/sdapi/v1/schedulers", "/sdapi/v1/sd-vae", "/sdapi/v1/refresh-checkpoints",
                 "/sdapi/v1/refresh-vae", "/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint",
                 "/internal/progress"):
        assert path in paths
    body_schema = spec["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert body_schema["steps"]["default"] == 50 and body_schema["sampler_index"]["default"] == "Euler"
    assert body_schema["save_images"]["default"] is False and body_schema["send_images"]["default"] is True
