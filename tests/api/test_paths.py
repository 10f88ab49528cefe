"""Server paths a request names must lie inside the studio's folders (``studio.paths``): the REST routes, the
Train tab's and img2img batch's handlers, the extension API. Outside (absolute, ``../..``, a symlink out) is a 422
naming the field, and nothing is written there; paths inside keep working."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from studio.errors import StudioError
from studio.paths import allowed_roots, confine, plain_name
from studio.settings import Settings
from tests.api.conftest import make_studio
from tests.training.conftest import write_dataset

ESCAPE = "../../studio-paths-escape"      # relative to the working directory: leaves the worktree


@pytest.fixture(scope="module")
def world(model_store, tmp_path_factory):
    """Own models folder (checkpoints are symlinks into the shared store, which lies outside every root), a
    symlink models/Lora/escape -> an outside folder, a dataset in data/datasets, files outside."""
    tmp = tmp_path_factory.mktemp("paths")
    models = tmp / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    for f in (model_store / "Stable-diffusion").glob("*.safetensors"):
        (models / "Stable-diffusion" / f.name).symlink_to(f)
    outside = tmp / "outside"            # requests try to write here
    outside.mkdir()
    (models / "Lora").mkdir()
    (models / "Lora" / "escape").symlink_to(outside, target_is_directory=True)
    files = tmp / "outside-files"        # requests try to read these
    write_dataset(files / "ds", 2)
    (files / "model.safetensors").write_bytes(b"not read")
    (files / "prompts.txt").write_text("secret prompt\n")
    studio = make_studio(models, tmp / "data", tmp / "outputs")
    dataset = write_dataset(tmp / "data" / "datasets" / "shapes", 2)
    yield SimpleNamespace(studio=studio, models=models, outside=outside, files=files, dataset=dataset, tmp=tmp)
    studio.queue.interrupt()
    studio.close()


@pytest.fixture(scope="module")
def api_studio(world):
    return world.studio


def _nothing_written(world) -> None:
    assert list(world.outside.rglob("*")) == []
    assert not Path(ESCAPE).resolve().exists()
    assert not (world.studio.training.runs_dir / "paths_t").exists()


def _config(world, **kw) -> dict:
    body = {"base_model": "tiny-sd1", "dataset_dir": str(world.dataset), "resolution": 64, "min_image_side": 32,
            "max_steps": 1, "output_name": "paths_t", "sample_at_start": False}
    body.update(kw)
    return body


# ---- the rule ------------------------------------------------------------------------------------------------
def test_confine_resolves_inside_and_refuses_outside_and_symlink_escapes(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    out.mkdir()
    (root / "link").symlink_to(out, target_is_directory=True)
    roots = (root.resolve(),)
    assert confine(root / "sub" / "new.txt", roots, "f") == (root / "sub" / "new.txt").resolve()
    assert confine(str(root / "sub" / ".." / "x"), roots, "f") == (root / "x").resolve()
    for bad in (out, root / ".." / "out", root / "link", root / "link" / "deeper", "/etc/passwd", "a\x00b", ""):
        with pytest.raises(StudioError) as err:
            confine(bad, roots, "section.name")
        assert err.value.field == "section.name" and err.value.status == 422
    with pytest.raises(StudioError) as err:
        confine(out, roots, "f")
    assert str(root.resolve()) in err.value.fix                 # says which folders are allowed


def test_model_folders_set_outside_models_dir_are_roots(tmp_path):
    """An A1111 user points --ckpt-dir / --lora-dir... at an A1111 install: those folders are allowed."""
    a1111 = tmp_path / "a1111" / "models"
    s = Settings(models_dir=str(tmp_path / "studio-models"), ckpt_dir=str(a1111 / "Stable-diffusion"),
                 vae_dir=str(a1111 / "VAE"), lora_dir=str(a1111 / "Lora"), lycoris_dir=str(a1111 / "LyCORIS"),
                 embeddings_dir=str(tmp_path / "a1111" / "embeddings"), controlnet_dir=str(a1111 / "ControlNet"),
                 annotators_dir=str(tmp_path / "annot"), data_dir=str(tmp_path / "data"),
                 outdir=str(tmp_path / "out"))
    roots = allowed_roots(s)
    for sub in ("Stable-diffusion/x.safetensors", "VAE/v.pt", "Lora/l.safetensors", "LyCORIS/y", "ControlNet/c"):
        assert confine(a1111 / sub, roots, "f")
    for folder in ("a1111/embeddings", "annot", "data", "out", "studio-models/Lora"):
        assert confine(tmp_path / folder / "file", roots, "f")
    with pytest.raises(StudioError):
        confine(a1111 / "other.txt", roots, "f")                # the A1111 models root itself is not a root


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", "x..y", ".hidden", "", "  ", "c:d"])
def test_plain_name_refuses_paths(name):
    with pytest.raises(StudioError) as err:
        plain_name(name, "output_name")
    assert err.value.field == "output_name"


# ---- POST /sdapi/v1/train/start ------------------------------------------------------------------------------
def _bad_values(world, field: str) -> list:
    key = field.split(".")[1]
    if key == "base_model":
        return [str(world.files / "model.safetensors"), str(world.models / "Stable-diffusion" / "tiny-sd1.safetensors"),
                ESCAPE + "/m.safetensors"]
    if key == "sample_prompts":
        return [str(world.files / "prompts.txt")]
    if key == "dataset_dir":
        return [str(world.files / "ds"), ESCAPE, str(world.models / "Lora" / "escape")]
    return [str(world.outside / "sub"), ESCAPE, str(world.models / "Lora" / "escape"),
            str(world.models / "Lora" / "escape" / "deeper")]


@pytest.mark.parametrize("field", ["output.output_dir", "output.run_dir", "model.models_dir", "dataset.dataset_dir",
                                   "dreambooth.class_images_dir", "model.base_model", "sampling.sample_prompts"])
def test_train_start_refuses_paths_outside(client, world, field):
    key = field.split(".")[1]
    for value in _bad_values(world, field):
        extra = {"method": "dreambooth_lora", "class_prompt": "a shape"} if key == "class_images_dir" else {}
        body = _config(world, **extra, **{key: value})
        r = client.post("/sdapi/v1/train/start", json=body)
        assert r.status_code == 422, (value, r.text)
        assert r.json()["field"] == field, (value, r.json())
        assert "outside the folders" in r.json()["detail"] and str((world.tmp / "data").resolve()) in r.json()["detail"]
        _nothing_written(world)
    assert client.get("/sdapi/v1/train/status").json()["current"] is None


@pytest.mark.parametrize("name", ["../evil", "a/b", ".."])
def test_train_start_refuses_output_names_with_paths(client, world, name):
    r = client.post("/sdapi/v1/train/start", json=_config(world, output_name=name))
    assert r.status_code == 422 and r.json()["field"] == "output.output_name", r.text
    _nothing_written(world)


def test_paths_inside_still_work(world):
    """Every path inside the studio's folders passes; a checkpoint named by the registry may be a symlink out."""
    svc, data = world.studio.training, world.tmp / "data"
    prompts = data / "prompts.txt"
    prompts.write_text("a shape --w 64 --h 64\n")
    cfg = svc.complete(_config(world, method="dreambooth_lora", class_prompt="a shape",
                               class_images_dir=str(data / "class"), output_dir=str(world.tmp / "outputs" / "loras"),
                               run_dir=str(data / "training" / "mine"), models_dir=str(world.models),
                               sample_prompts=str(prompts)), confined=True)
    assert cfg.base_model == str((world.models / "Stable-diffusion" / "tiny-sd1.safetensors").resolve())
    assert cfg.output_dir == str((world.tmp / "outputs" / "loras").resolve())
    assert svc.complete(_config(world, base_model=str(world.models / "Stable-diffusion" / "tiny-sd1.safetensors")))
    path = svc.write_config(_config(world, output_name="inside_ok"), confined=True)   # what the tab's Save does
    assert path == (data / "training" / "inside_ok" / "run.toml").resolve() and path.is_file()


# ---- merge routes: output names ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil", "sub/evil", "..", "x\\y"])
def test_merge_output_names_must_be_plain(client, world, name):
    before = sorted(p.name for p in world.models.rglob("*"))
    r = client.post("/sdapi/v1/merge/checkpoints", json={"a": "tiny-sd1", "b": "tiny-sd1-b", "output_name": name})
    assert r.status_code == 422 and r.json()["field"] == "output_name", r.text
    r = client.post("/sdapi/v1/merge/lora", json={"action": "merge", "loras": [{"name": "any"}], "output_name": name})
    assert r.status_code == 422 and r.json()["field"] == "output_name", r.text
    assert sorted(p.name for p in world.models.rglob("*")) == before
    _nothing_written(world)


# ---- the tabs' handlers ----------------------------------------------------------------------------------------
def test_img2img_batch_folders_are_confined(world):
    from studio.batch import confine_batch_paths
    s = world.studio.settings
    inside = str(world.tmp / "outputs" / "batch")
    for args, field in (((str(world.files / "ds"), inside, None), "input_dir"),
                        ((ESCAPE, inside, None), "input_dir"),
                        ((inside, str(world.outside / "out"), None), "output_dir"),
                        ((inside, str(world.models / "Lora" / "escape"), None), "output_dir"),
                        ((inside, inside, str(world.files)), "mask_dir")):
        with pytest.raises(StudioError) as err:
            confine_batch_paths(s, *args)
        assert err.value.field == field
    dropped = ["/tmp/gradio/upload.png"]            # Gradio's uploads (a list) are not typed paths
    assert confine_batch_paths(s, dropped, inside, "") == (dropped, str(Path(inside).resolve()), "")
    _nothing_written(world)


def test_train_tab_handlers_are_confined(world):
    from webui.train_dataset import _scan, import_action
    svc = world.studio.training
    with pytest.raises(StudioError) as err:
        _scan(svc, str(world.files / "ds"), 32, 1, ".txt")
    assert err.value.field == "dataset.dataset_dir"
    assert len(_scan(svc, str(world.dataset), 32, 1, ".txt").items) == 2
    for source in (str(world.files / "ds"), ESCAPE, "/etc"):
        with pytest.raises(StudioError) as err:
            import_action(svc, None, source, "stolen")
        assert err.value.field == "dataset_source"
    assert not (svc.datasets_dir() / "stolen").exists()
    with pytest.raises(StudioError) as err:
        import_action(svc, None, str(world.dataset), "../stolen")
    assert err.value.field == "dataset_name"
    text, dest = import_action(svc, None, str(world.dataset), "copy")          # inside: works
    assert Path(dest) == svc.datasets_dir() / "copy" and len(list(Path(dest).glob("*.png"))) == 2
    toml = world.outside.parent / "outside-files" / "run.toml"
    toml.write_text('[output]\noutput_name = "x"\n')
    with pytest.raises(StudioError) as err:
        svc.load_config(toml)
    assert err.value.field == "config_path"
    with pytest.raises(StudioError) as err:                    # what the tab's Start calls
        svc.start(_config(world, output_dir=str(world.outside)), confined=True)
    assert err.value.field == "output.output_dir" and not svc.queue.pending()
    with pytest.raises(StudioError) as err:
        svc.resume("../../outside")
    assert err.value.field == "run"
    _nothing_written(world)


def test_extension_api_confines_paths(world):
    from studio.extension_api import StudioAPI
    api = StudioAPI(world.studio, "probe")
    assert api.confine_path(str(world.dataset), "folder") == str(world.dataset.resolve())
    with pytest.raises(StudioError) as err:
        api.confine_path(os.fspath(world.outside), "folder")
    assert err.value.field == "folder"
