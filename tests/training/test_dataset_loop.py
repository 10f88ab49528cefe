"""The train -> use -> refine loop's plumbing: pictures sent into datasets (service, REST, the gallery button),
dataset versions and the runs that read them, and a finished run set up to be refined."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from studio.errors import StudioError

INFOTEXT = ("zkw, a red heart  on a blue background <lora:heart_lora:0.8>\nNegative prompt: blurry\n"
            "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64")


def _png(path, colour=(200, 30, 30), infotext=INFOTEXT):
    from studio.infotext import png_text
    Image.new("RGB", (64, 64), colour).save(path, pnginfo=png_text(infotext) if infotext else None)
    return path


def test_a_sent_picture_lands_with_its_prompt_as_caption_once(studio, tmp_path):
    svc = studio.training
    src = _png(tmp_path / "00003-5.png")
    path, caption, version, added = svc.add_to_dataset("sent", src)
    assert added and path == svc.datasets_dir() / "sent" / "00003-5.png"
    assert caption == "zkw, a red heart on a blue background"            # the LoRA tag goes, the words stay
    assert (path.with_suffix(".txt")).read_text().strip() == caption
    assert Image.open(path).info["parameters"] == INFOTEXT                # how it was made stays with it
    assert (version["version"], version["images"]) == (1, 1)
    again = svc.add_to_dataset("sent", src)
    assert again[0] == path and not again[3] and again[2]["version"] == 1     # a double click adds nothing
    (tmp_path / "b").mkdir()
    other = svc.add_to_dataset("sent", _png(tmp_path / "b" / "00003-5.png", (30, 30, 200)), "my own caption")
    assert other[0].name == "00003-5-2.png" and other[1] == "my own caption" and other[2]["version"] == 2
    assert svc.dataset_names() == ["sent"]


def test_a_kohya_dataset_gets_the_picture_in_its_repeats_folder(studio, tmp_path):
    from studio.demo_world import write_example_dataset
    svc = studio.training
    folder = svc.datasets_dir() / "hearts"
    write_example_dataset(folder, "heart", count=4, trigger="zkw", repeats=10)
    path, _, version, _ = svc.add_to_dataset("hearts", _png(tmp_path / "x.png"))
    assert path.parent == folder / "10_heart" and version["images"] == 5
    assert version["changes"] == {"added": 1, "removed": 0, "replaced": 0, "recaptioned": 0}


def test_bad_sends_are_refused_naming_the_thing(studio, tmp_path):
    svc = studio.training
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(StudioError, match="broken.png is not an image this studio can read") as exc:
        svc.add_to_dataset("sent", broken)
    assert exc.value.field == "image"
    for name in ("", "../outside", "/etc"):
        with pytest.raises(StudioError):
            svc.add_to_dataset(name, _png(tmp_path / "ok.png"))
    assert not (svc.datasets_dir() / "sent").exists()


def test_a_run_records_the_version_it_read_and_the_history_shows_it(studio, settings, tmp_path):
    from tests.training.conftest import write_dataset
    svc = studio.training
    folder = write_dataset(svc.datasets_dir() / "shapes", 4)
    base = str(settings.ckpt_path / "tiny-sd1.safetensors")
    cfg = svc.complete({"base_model": base, "dataset_dir": str(folder), "output_name": "shp", "resolution": 64,
                        "min_image_side": 32, "max_steps": 1})
    svc._note_dataset(cfg)
    svc.add_to_dataset("shapes", _png(tmp_path / "new.png"))
    versions = svc.versions.versions(folder)
    assert [(v["version"], v["images"], v["runs"]) for v in versions] == [(1, 4, ["shp"]), (2, 5, [])]
    read = svc.run_dataset(cfg.run_dir)
    assert read["version"] == 1 and sorted(read["files"]) == [f"img{i}.png" for i in range(4)]


def test_refine_config_goes_on_from_the_final_file_under_a_new_name(studio, settings):
    from studio.training.config import TrainConfig
    svc = studio.training
    for name in ("heart", "pose"):
        run = svc.runs_dir / name
        run.mkdir(parents=True)
        method = "controlnet" if name == "pose" else "lora"
        out = settings.controlnet_path if method == "controlnet" else settings.lora_path
        TrainConfig(base_model="b.safetensors", dataset_dir="d", output_name=name, method=method,
                    output_dir=str(out), rank=16).save(run / "run.toml")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.safetensors").write_bytes(b"x")
    assert {r for r, _ in svc.finished_runs()} == {"heart", "pose"}
    cfg = svc.refine_config("heart")
    assert cfg.network_weights == str(settings.lora_path / "heart.safetensors")
    assert (cfg.output_name, cfg.rank, cfg.run_dir, cfg.resume) == ("heart_r2", 16, "", False)
    (svc.runs_dir / "heart_r2").mkdir()
    assert svc.refine_config("heart").output_name == "heart_r3"
    assert svc.refine_config("pose").controlnet_init.endswith("pose.safetensors")
    with pytest.raises(StudioError, match="no finished file"):
        svc.refine_config("nothing")


def test_the_rest_routes_add_and_list(studio, tmp_path):
    import httpx
    from tests.api.conftest import make_app, serve
    raw = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(raw, format="PNG")
    body = {"dataset": "api-set", "image": base64.b64encode(raw.getvalue()).decode(), "infotext": INFOTEXT,
            "name": "first"}
    with serve(make_app(studio)) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/sdapi/v1/train/datasets/add", json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["added"] and got["caption"] == "zkw, a red heart on a blue background" and got["version"] == 1
        assert got["path"].endswith("api-set/first.png")
        assert c.post("/sdapi/v1/train/datasets/add", json=body).json()["added"] is False
        listing = c.get("/sdapi/v1/train/datasets").json()
        assert [(d["name"], d["images"], [v["version"] for v in d["versions"]]) for d in listing] == \
            [("api-set", 1, [1])]
        for bad, field in (({**body, "image": "not an image"}, "image"), ({**body, "dataset": "../x"}, "dataset")):
            r = c.post("/sdapi/v1/train/datasets/add", json=bad)
            assert r.status_code == 422 and r.json().get("field") == field, r.text


def test_the_gallery_button_sends_the_selected_picture(studio, tmp_path):
    from webui.generation import send_to_dataset
    paths = [str(_png(tmp_path / "a.png", (1, 2, 3))), str(_png(tmp_path / "b.png", (4, 5, 6)))]
    results = {"paths": paths, "infotexts": [INFOTEXT, "a blue circle\nSteps: 20, Seed: 1, Size: 64x64"],
               "selected": 1}
    note, update = send_to_dataset(studio, results, "from-gallery")
    assert "Added from-gallery/b.png" in note and "a blue circle" in note
    assert update["value"] == "from-gallery" and "from-gallery" in update["choices"]
    assert "Pick a dataset" in send_to_dataset(studio, results, " ")[0]
    assert "Nothing to send" in send_to_dataset(studio, {"paths": []}, "x")[0]
