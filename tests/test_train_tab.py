"""Train tab helpers without a browser: widget values -> config, error labels, the "Try it" infotext."""
from __future__ import annotations

import pytest

from studio.errors import StudioError


def test_form_values_become_typed_config_fields():
    from studio.training.config import TrainConfig
    from webui.train_form import to_config_dict
    names = ["rank", "alpha", "max_steps", "train_unet", "output_name", "sample_prompts", "learning_rate"]
    out = to_config_dict(names, (4.0, 2, 10.0, 1, " shapes ", "a dog --w 64\n", 0.001))
    assert out == {"rank": 4, "alpha": 2.0, "max_steps": 10, "train_unet": True, "output_name": "shapes",
                   "sample_prompts": "a dog --w 64\n", "learning_rate": 0.001}
    TrainConfig.from_dict(out).validate(check_files=False)
    with pytest.raises(StudioError) as err:
        to_config_dict(["rank"], (2.5,))
    assert err.value.field == "network.rank"
    with pytest.raises(StudioError) as err:
        to_config_dict(["max_steps"], (None,))
    assert err.value.field == "training.max_steps"


def test_error_label_names_widget_and_key():
    from types import SimpleNamespace
    from webui.train_form import label_of
    f = {"max_steps": SimpleNamespace(label="Max steps")}
    assert label_of(f, "training.max_steps") == "Max steps (training.max_steps)"
    assert label_of(f, "dataset_name") == "dataset_name"
    assert label_of(f, None) == ""


def test_try_it_text_carries_tag_trigger_and_sample_options():
    from studio.infotext import params_to_request_fields, parse_infotext
    from webui.train_run import try_it_text
    tried = {"name": "shapes", "ti": False, "token": "", "instance": "",
             "sample": "# comment\nshp, a red circle --n blurry --w 64 --h 96 --d 3 --l 5 --s 12\nsecond"}
    text = try_it_text(tried, "shp", "demo-untrained")
    fields = params_to_request_fields(parse_infotext(text))
    assert fields["prompt"] == "<lora:shapes:1>, shp, a red circle"       # trigger already in the prompt: once
    assert fields["negative_prompt"] == "blurry"
    assert (fields["width"], fields["height"], fields["seed"], fields["steps"]) == (64, 96, 3, 12)
    assert fields["cfg_scale"] == 5
    assert try_it_text({**tried, "sample": ""}, "zzz", None) == "<lora:shapes:1>, zzz"
    ti = {**tried, "ti": True, "token": "my-tok", "sample": "a photo of my-tok"}
    assert try_it_text(ti, "", None) == "a photo of shapes"
    cn = {**tried, "controlnet": "canny", "sample": "a red circle --w 64 --h 64 --cn /x/edge.png"}
    from studio.controlnet import units_from_params
    params = parse_infotext(try_it_text(cn, "shp", None))
    assert params_to_request_fields(params)["prompt"] == "a red circle"     # no LoRA tag, no trigger
    (unit,) = units_from_params(params)
    assert (unit.module, unit.model, unit.weight) == ("canny", "shapes", 1.0)
    (paired,) = units_from_params(parse_infotext(try_it_text({**cn, "controlnet": "folder"}, "", None)))
    assert paired.module == "none"


def test_caption_table_edits_and_bucket_report(tmp_path):
    from types import SimpleNamespace
    from studio.training.service import TrainingService
    from tests.training.conftest import write_dataset
    from webui.train_dataset import _bucket_report, _view, _write_table
    ds = write_dataset(tmp_path / "data" / "datasets" / "ds", 2, sizes=[(64, 64), (128, 64)])   # a studio folder
    svc = TrainingService(SimpleNamespace(settings=SimpleNamespace(data_dir=str(tmp_path / "data"))))
    scan = [str(ds), 32, 1, ".txt"]
    (thumbs, rows, tags, versions), summary = _view(svc, *scan)
    assert [r[0] for r in rows] == ["img0.png", "img1.png"] and len(thumbs) == 2
    assert ["shp", 2] in tags and "2 image(s)" in summary
    assert [v[:3] for v in versions] == [[1, versions[0][1], 2]] and versions[0][3] == "+2 image(s)"
    rows[1][1] = "shp, a wide square"
    assert _write_table(svc, rows, *scan) == 1                      # only the edited caption is rewritten
    assert (ds / "img1.txt").read_text().strip() == "shp, a wide square"
    versions = _view(svc, *scan)[0][3]                              # newest first
    assert [v[0] for v in versions] == [2, 1] and versions[0][3] == "1 caption(s) changed"
    assert _view(svc, *scan)[0][3] == versions                      # an unchanged folder is no new version
    report = _bucket_report(svc, 64, True, 64, 128, 64, *scan)
    assert "img0.png" in report and "img1.png" in report and "64x64" in report
    assert "centre crop at 64×64" in _bucket_report(svc, 64, False, 64, 128, 64, *scan)


def test_finished_stop_clears_stopping_note_and_says_stopped(tmp_path):
    """The Stop button's "Stopping: ..." note in the error area goes when the run ends; the result says stopped."""
    from types import SimpleNamespace
    from webui.train_run import tick
    out_file = str(tmp_path / "Lora" / "shapes.safetensors")
    proc = SimpleNamespace(status=lambda: {"state": "stopped", "step": 20, "total": 40, "outputs": [out_file],
                                           "losses": [(20, 0.1)], "samples": [], "log": "", "loss": 0.1})
    job = {"id": "j1", "process": proc, "state": "stopped", "error": None, "config": ""}
    svc = SimpleNamespace(status=lambda: {"current": None, "queued": []}, queue=SimpleNamespace(finished=[job]),
                          history=lambda: [], finished_runs=lambda: [])
    names = ("progress", "loss", "samples", "log", "result", "try", "history", "state", "timer", "error",
             "refine_run")
    r = {n: type("Widget", (), {"name": n})() for n in names}      # hashable stand-ins
    out = tick(SimpleNamespace(training=svc), r, {"job": "j1"})
    assert out[r["error"]] == ""
    assert "Stopped early" in out[r["result"]] and "shapes.safetensors" in out[r["result"]]
    assert "stopped" in out[r["progress"]] and "20/40" in out[r["progress"]]


def test_stop_before_the_first_step_is_a_note_not_an_error(tmp_path):
    """Stopped while class images were made: nothing was written, and the tab says so without an error box."""
    from types import SimpleNamespace
    from webui.train_run import tick
    proc = SimpleNamespace(status=lambda: {"state": "stopped", "step": 0, "total": 40, "outputs": [],
                                           "losses": [], "samples": [], "log": "", "loss": None})
    job = {"id": "j1", "process": proc, "state": "stopped", "error": None, "config": ""}
    svc = SimpleNamespace(status=lambda: {"current": None, "queued": []}, queue=SimpleNamespace(finished=[job]),
                          history=lambda: [], finished_runs=lambda: [])
    names = ("progress", "loss", "samples", "log", "result", "try", "history", "state", "timer", "error",
             "refine_run")
    r = {n: type("Widget", (), {"name": n})() for n in names}
    out = tick(SimpleNamespace(training=svc), r, {"job": "j1"})
    assert "before the first training step" in out[r["result"]]
    assert "studio-error" not in out[r["result"]] and "wrote no file" not in out[r["result"]]


def test_example_dataset_sets_the_recipe_that_teaches_the_heart(studio):
    """The Example dataset button fills in the settings the concept-learning tests train with."""
    from studio.demo import EXAMPLE_RECIPE
    from studio.training import TrainConfig
    from webui.train_dataset import example_values
    v = example_values(studio)
    assert {k: v[k] for k in EXAMPLE_RECIPE} == EXAMPLE_RECIPE and v["resolution"] == 64
    cfg = TrainConfig(dataset_dir=v["dataset_dir"], **EXAMPLE_RECIPE)   # every key is a real training field
    assert cfg.max_steps == 400 and "learning rate 0.001" in v["message"]
