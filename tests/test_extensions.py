"""Extensions: every hook documented and exercised (UI, API, settings, preprocessors, engine), isolation,
enable/disable, install (folder, zip, zip-slip), launch.py's requirements step, and the three built-ins."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio import hookspecs
from studio.errors import StudioError
from studio.request import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "extensions_fixture"
BUILTINS = ROOT / "extensions"
TINY = dict(width=64, height=64, steps=2, sampler_name="Euler")
HOOKS = {name: list(inspect.signature(fn).parameters)
         for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("studio_")}

BAD_TAB = '''from studio.extension_api import TabSpec, hookimpl

@hookimpl
def studio_tabs(api):
    def build(api):
        raise RuntimeError("tab build exploded")
    return [TabSpec("Bad tab", build, elem_id="bad_tab")]
'''


def api_args(**kw) -> argparse.Namespace:
    base = dict(listen=False, port=None, nowebui=True, api=True, gradio_auth=None, api_auth=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture(scope="module")
def ext_studio(model_store, tmp_path_factory):
    """One Studio with the stub, the broken fixtures, a tab that fails to build, an import error and the
    built-ins; (studio, stub CALLS)."""
    from studio.app import Studio
    from studio.settings import Settings

    tmp = tmp_path_factory.mktemp("ext")
    root = tmp / "extensions"
    shutil.copytree(FIXTURE, root)
    for name in ("xyz_plot", "prompts_from_file", "blueprint_lines"):
        shutil.copytree(BUILTINS / name, root / name)
    (root / "badtab").mkdir()
    (root / "badtab" / "__init__.py").write_text(BAD_TAB)
    (root / "importerr").mkdir()
    (root / "importerr" / "__init__.py").write_text("import no_such_module_anywhere\n")
    models = tmp / "models"
    shutil.copytree(model_store, models)
    settings = Settings(models_dir=str(models), data_dir=str(tmp / "data"), outdir=str(tmp / "outputs"),
                        default_checkpoint="tiny-sd1.safetensors", extensions_dir=str(root), preview_every=0)
    studio = Studio(settings)
    yield studio, sys.modules["studio_extension_stub"].CALLS
    studio.close()


def ext_module(studio, name: str, sub: str):
    return importlib.import_module(f"studio_extension_{name}.{sub}")


def called(calls: list) -> set[str]:
    return {c if isinstance(c, str) else c[0] for c in calls}


# ---- the meta-test --------------------------------------------------------------------------------------
def test_every_hook_is_documented_and_exercised(ext_studio):
    studio, calls = ext_studio
    readme = (BUILTINS / "README.md").read_text()
    stub = sys.modules["studio_extension_stub"]
    for name, args in HOOKS.items():
        assert f"`{name}({', '.join(args)})`" in readme, f"{name} is not documented in extensions/README.md"
        assert callable(getattr(stub, name, None)), f"the stub extension does not implement {name}"

    # UI: the stub's tab is built inside its own gr.Tab; settings are on the Extensions tab
    from webui.layout import build_blocks
    blocks = build_blocks(studio)
    elem_ids = {c.get("props", {}).get("elem_id") for c in blocks.config["components"]}
    assert {"stub_tab", "tab_xyz_plot", "tab_prompts_from_file", "extsetting_stub_greeting"} <= elem_ids
    assert "tab_built" in calls
    # API: the stub's route, behind the API's auth when --api-auth is given
    from fastapi.testclient import TestClient

    from webui.server import api_routers, build_app
    args = api_args()
    client = TestClient(build_app(studio, args, extra_routers=api_routers(studio, args)))
    assert client.get("/stub/ping").json() == {"pong": True, "ext": "stub"}
    module_list = client.get("/controlnet/module_list")
    if module_list.status_code == 200:  # the ControlNet API routes exist
        assert "blueprint_lines" in module_list.json()["module_list"]
    locked = api_args(api_auth="u:p")
    client = TestClient(build_app(studio, locked, extra_routers=api_routers(studio, locked)))
    assert client.get("/stub/ping").status_code == 401
    assert client.get("/stub/ping", auth=("u", "p")).json()["pong"] is True
    # ControlNet preprocessor and upscaler registries
    assert "stub_invert" in studio.preprocessors.names() and "Stub nearest" in studio.engine.upscalers.names()
    # engine hooks: one tiny job
    studio.generate(GenerationRequest(prompt="a cube", seed=3, **TINY))
    missing = set(HOOKS) - called(calls)
    assert not missing, f"hooks declared but not exercised by the stub: {sorted(missing)}"


def test_extension_settings_are_saved_to_the_settings_file(ext_studio):
    studio, _ = ext_studio
    from studio.settings import Settings
    from tabs.extensions import _save_settings
    api = studio.extensions.api("stub")
    assert api.setting("stub_greeting") == "hello"                     # the SettingSpec's default
    specs = [spec for _, spec in studio.extensions.setting_specs()]
    assert "Saved" in _save_settings(studio.extensions, specs, ("bonjour",))
    assert api.setting("stub_greeting") == "bonjour"
    stored, _ = Settings.load(studio.settings.data_dir)
    assert stored.extension_settings["stub_greeting"] == "bonjour"


def test_broken_extensions_are_isolated_and_reported(ext_studio):
    studio, _ = ext_studio
    from tabs.extensions import render_table
    from webui.layout import build_blocks
    blocks = build_blocks(studio)                                     # the UI loads despite "badtab"
    values = [str(c.get("props", {}).get("value")) for c in blocks.config["components"]]
    assert any("could not build this tab" in v and "badtab" in v for v in values)   # its tab shows why
    exts = studio.extensions.extensions
    assert exts["importerr"].status == "error" and "no_such_module_anywhere" in exts["importerr"].errors[0]
    assert any("tab build exploded" in e for e in exts["badtab"].errors)
    assert exts["xyz_plot"].status == "loaded" and not exts["xyz_plot"].errors
    table = render_table(studio.extensions)
    assert "<details>" in table and "Traceback" in table and "tab build exploded" in table
    assert "file://" in table                                          # "open its folder"


def test_enable_disable_persists_through_the_tab(ext_studio):
    studio, _ = ext_studio
    from studio.extensions import ExtensionManager
    from tabs.extensions import _set_enabled
    names = [e.name for e in studio.extensions.listing() if e.enabled and e.name != "broken"]
    message, table = _set_enabled(studio.extensions, names)
    assert "after a UI reload / restart" in message and "disabled at the next start" in table
    again = ExtensionManager(studio.extensions.roots, studio.extensions.state_file)
    assert {e.name: e.enabled for e in again.discover()}["broken"] is False
    _set_enabled(studio.extensions, names + ["broken"])
    assert {e.name: e.enabled for e in again.discover()}["broken"] is True


# ---- installing -----------------------------------------------------------------------------------------
@pytest.fixture()
def manager(tmp_path):
    from studio.extensions import ExtensionManager
    return ExtensionManager([tmp_path / "extensions"], tmp_path / "data" / "extensions.json")


def make_source(folder: Path, name: str = "hello") -> Path:
    folder.mkdir(parents=True)
    (folder / "extension.toml").write_text(f'[extension]\nname = "{name}"\nversion = "0.2"\napi_version = "1.0"\n')
    (folder / "__init__.py").write_text("from studio.extension_api import hookimpl\n")
    return folder


def test_install_from_folder_and_name_collision(manager, tmp_path):
    ext = manager.install_from_folder(make_source(tmp_path / "src" / "hello-main"))
    assert ext.name == "hello" and (tmp_path / "extensions" / "hello" / "extension.toml").is_file()
    assert "restart" in ext.status and [e.name for e in manager.listing()] == ["hello"]
    with pytest.raises(StudioError, match="already installed"):
        manager.install_from_folder(tmp_path / "src" / "hello-main")
    with pytest.raises(StudioError, match="does not look like an extension"):
        manager.install_from_folder(tmp_path / "src")


def test_install_from_zip_and_zip_slip_refused(manager, tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:       # GitHub style: one top folder
        zf.writestr("zipped-main/extension.toml", '[extension]\nname = "zipped"\n')
        zf.writestr("zipped-main/__init__.py", "")
    assert manager.install_from_zip(good).path == tmp_path / "extensions" / "zipped"
    for evil in ("../evil.py", "/tmp/evil.py", "a/../../evil.py", "C:/evil.py"):
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("extension.toml", '[extension]\nname = "bad"\n')
            zf.writestr(evil, "print('pwned')")
        with pytest.raises(StudioError, match="outside the extension folder"):
            manager.install_from_zip(bad)
    assert not (tmp_path / "evil.py").exists() and sorted(p.name for p in (tmp_path / "extensions").iterdir()) \
        == ["zipped"]
    (tmp_path / "notzip.zip").write_text("nope")
    with pytest.raises(StudioError, match="not a readable zip"):
        manager.install_from_zip(tmp_path / "notzip.zip")


def _launch():
    spec = importlib.util.spec_from_file_location("_launch_ext_test", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_installs_enabled_extension_requirements(tmp_path, monkeypatch):
    from studio.extensions import ExtensionManager
    launch = _launch()
    cli = launch.load_cli()
    monkeypatch.setattr(launch, "load_cli", lambda: cli)
    monkeypatch.setattr(launch, "ROOT", tmp_path)
    monkeypatch.setattr(launch.sys, "prefix", str(tmp_path / "venv"))
    (tmp_path / "venv").mkdir()
    for name in ("one", "two", "three"):
        make_source(tmp_path / "extensions" / name, name)
    (tmp_path / "extensions" / "one" / "requirements.txt").write_text("pkg-one==1.0\n")
    (tmp_path / "extensions" / "two" / "requirements.txt").write_text("pkg-two==2.0\n")
    ExtensionManager([tmp_path / "extensions"], tmp_path / "data" / "extensions.json").set_enabled("two", False)
    pip_runs = []
    monkeypatch.setattr(launch, "pip_install", lambda *args: pip_runs.append(args))
    args = argparse.Namespace(skip_install=False, test=False, xformers=False)
    launch.install_extension_requirements(args)
    assert len(pip_runs) == 1 and pip_runs[0][-1].endswith("one/requirements.txt")   # "two" is disabled
    assert pip_runs[0][:2] == ("-c", str(launch.REQUIREMENTS))                          # studio pins hold
    stamp = launch.stamp_path(tmp_path / "extensions" / "one" / "requirements.txt")
    assert stamp.name == ".studio-install-ext-one-requirements.txt.json" and stamp.is_file()
    monkeypatch.setattr(launch, "installed_versions", lambda: {"pkg-one": "1.0"})
    launch.install_extension_requirements(args)
    assert len(pip_runs) == 1                                                           # stamp matches
    monkeypatch.setattr(launch, "in_venv", lambda: True)
    launch.setup_environment(argparse.Namespace(skip_install=True, test=False, xformers=False), [])
    assert len(pip_runs) == 1                                                           # --skip-install


# ---- X/Y/Z plot -----------------------------------------------------------------------------------------
def xyz_module():
    spec = importlib.util.spec_from_file_location("_xyz_test", BUILTINS / "xyz_plot" / "__init__.py",
                                                  submodule_search_locations=[str(BUILTINS / "xyz_plot")])
    sys.modules.setdefault("_xyz_test", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(sys.modules["_xyz_test"])
    return importlib.import_module("_xyz_test.xyz")


def test_xyz_axis_parsing():
    xyz = xyz_module()
    parse = xyz.parse_axis
    assert parse("Seed", "1, 2, 3").values == (1, 2, 3)
    assert parse("Steps", "1-5").values == (1, 2, 3, 4, 5)
    assert parse("Steps", "1-5 (+2)").values == (1, 3, 5)
    assert parse("Steps", "10-1 (-3)").values == (10, 7, 4, 1)
    assert parse("Steps", "1-10 [5]").values == (1, 3, 5, 7, 10)
    assert parse("CFG scale", "5-7 (+0.5)").values == (5.0, 5.5, 6.0, 6.5, 7.0)
    assert parse("CFG scale", "1-2 [3]").values == (1.0, 1.5, 2.0)
    assert parse("Prompt S/R", '0.5, "0.8", "cat, dog"').values == ("0.5", "0.8", "cat, dog")
    assert parse("Sampler", "euler a, Euler", lambda _: ["Euler a", "Euler", "DDIM"]).values == ("Euler a", "Euler")
    with pytest.raises(StudioError, match="not known"):
        parse("Sampler", "Nope", lambda _: ["Euler"])
    with pytest.raises(StudioError, match="not a whole number"):
        parse("Steps", "two")
    base = GenerationRequest(prompt="a cat <lora:x:0.5>", seed=-1)
    cells = xyz.cell_requests(base, [parse("Prompt S/R", "0.5, 0.8"), parse("Steps", "2-3")])
    assert [c.request.prompt for c in cells] == ["a cat <lora:x:0.5>", "a cat <lora:x:0.8>"] * 2
    assert [c.request.steps for c in cells] == [2, 2, 3, 3] and len({c.request.seed for c in cells}) == 1
    with pytest.raises(StudioError, match="did not find"):
        xyz.cell_requests(base, [parse("Prompt S/R", "dog, cow")])


def test_xyz_grid_size_is_cells_plus_label_margins():
    xyz = xyz_module()
    cells = [Image.new("RGB", (64, 48), c) for c in ("red", "green", "blue", "gray", "red", "green")]
    grid = xyz.draw_grid(cells, ["Seed: 1", "Seed: 2", "Seed: 3"], ["Steps: 1", "Steps: 2"])
    left, top, ztitle = xyz.label_margins(64, 48, ["a"], ["b"], [""])
    assert left > 0 and top > 0 and ztitle == 0
    assert grid.size == (left + 3 * 64, top + 2 * 48)
    labels = np.asarray(grid.convert("L"))[:top, left:]
    assert (labels < 128).sum() > 20                                  # text was drawn in the top margin
    assert xyz.draw_grid(cells[:2], ["", ""], [""]).size == (128, 48)  # no labels, no margins


def test_xyz_plot_runs_cells_and_saves_the_grid(ext_studio):
    studio, _ = ext_studio
    xyz = ext_module(studio, "xyz_plot", "xyz")
    api = studio.extensions.api("xyz_plot")
    axes = [xyz.parse_axis("Seed", "1, 2"), xyz.parse_axis("Prompt S/R", "cube, ball")]
    plot = xyz.Plot(api, GenerationRequest(prompt="a red cube", **TINY), axes)
    grid, path = plot.run()
    assert len(plot.cells) == len(plot.images) == 4
    left, top, _ = xyz.label_margins(64, 64, ["x"], ["y"], [""])
    assert grid.size == (left + 2 * 64, top + 2 * 64)
    assert "Seed: 1," in plot.infotexts[0] and "Seed: 2," in plot.infotexts[1]
    assert plot.infotexts[2].startswith("a red ball") and plot.caption(3) == "Seed: 2 · ball"
    assert Path(path).parent.parent == Path(studio.settings.outdir) / "txt2img-grids"
    assert "Seed: 1," in Image.open(path).text["parameters"]


# ---- prompts from file ----------------------------------------------------------------------------------
def test_prompts_from_file_parsing():
    spec = importlib.util.spec_from_file_location("_pff_test", BUILTINS / "prompts_from_file" / "__init__.py",
                                                  submodule_search_locations=[str(BUILTINS / "prompts_from_file")])
    sys.modules.setdefault("_pff_test", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(sys.modules["_pff_test"])
    lines = importlib.import_module("_pff_test.lines")
    assert lines.parse_line("a plain prompt, with commas") == {"prompt": "a plain prompt, with commas"}
    assert lines.parse_line('--prompt "a b" --negative_prompt \'c\' --seed 5 --cfg_scale 6.5 '
                            '--sampler_name "Euler a" --checkpoint x --do_not_save_samples') == {
        "prompt": "a b", "negative_prompt": "c", "seed": 5, "cfg_scale": 6.5, "sampler_name": "Euler a",
        "checkpoint": "x", "save_images": False}
    for bad, message in (("--steps two", "not a valid int"), ("--nope 1", "unknown option"),
                         ("--seed", "needs a value"), ('--prompt "open', "unbalanced")):
        with pytest.raises(StudioError, match=message):
            lines.parse_line(bad)
    assert [n for n, _ in lines.jobs("a\n\n# comment\n b \n")] == [1, 4]


def test_prompts_from_file_runs_each_line_and_reports_bad_ones(ext_studio):
    studio, _ = ext_studio
    lines = ext_module(studio, "prompts_from_file", "lines")
    api = studio.extensions.api("prompts_from_file")
    text = "a cube\n--steps banana\n--prompt \"a ball\" --seed 7 --batch_size 2\n--width 65\n"
    results = lines.run_all(api, GenerationRequest(seed=1, **TINY), text)
    assert [r.number for r in results] == [1, 2, 3, 4]
    assert len(results[0].images) == 1 and results[0].result.prompts[0] == "a cube"
    assert "not a valid int" in results[1].error and not results[1].images
    assert len(results[2].images) == 2 and results[2].result.seeds[0] == 7 and not results[2].error
    assert "multiple of 8" in results[3].error
    ui = ext_module(studio, "prompts_from_file", "ui")                 # the tab's handler: log + gallery
    *_, (log, gallery) = ui._run(api, "a cube\n--nope 1\n", "", "Euler", 2, 7, 64, 64, 1)
    assert "line 1: 1 image(s)" in log and "line 2: unknown option --nope" in log and len(gallery) == 1


# ---- blueprint lines ------------------------------------------------------------------------------------
def plan_drawing() -> Image.Image:
    """A scanned-looking plan: off-white paper, thick walls, one thin wall, a speck of dust."""
    image = Image.new("RGB", (256, 256), (236, 232, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 30, 220, 220), outline=(25, 25, 45), width=8)
    draw.line((30, 120, 220, 120), fill=(25, 25, 45), width=6)
    draw.line((120, 30, 120, 120), fill=(60, 60, 80), width=2)
    draw.ellipse((180, 60, 183, 63), fill=(0, 0, 0))                # ~14 px speck
    return image


def test_blueprint_lines_is_a_controlnet_preprocessor_with_thin_lines(ext_studio):
    studio, _ = ext_studio
    assert "blueprint_lines" in studio.preprocessors.names()
    out = studio.preprocessors.run("blueprint_lines", plan_drawing(), 256, {"block_size": 31, "min_area": 24})
    lines = np.asarray(out.convert("L")) > 127
    assert out.size == (256, 256) and out.mode == "RGB"
    for column in (60, 100, 160, 200):                               # across the horizontal walls
        runs = _runs(lines[:, column])
        assert len(runs) == 3 and max(runs) <= 2, (column, runs)       # top, middle and bottom: 1-2 px
    assert len(_runs(lines[70, :])) == 3                               # left, thin inner and right wall
    assert not lines[50:75, 170:195].any()                             # the speck is gone
    kept = studio.preprocessors.run("blueprint_lines", plan_drawing(), 256, {"block_size": 31, "min_area": 0})
    assert (np.asarray(kept.convert("L"))[50:75, 170:195] > 127).any()  # ...because of min_area


def _runs(line: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-D array."""
    padded = np.concatenate([[0], line.astype(int), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(edges[1::2] - edges[::2])


def test_builtins_use_only_the_public_api():
    for path in BUILTINS.rglob("*.py"):
        for module in re.findall(r"^\s*(?:from|import)\s+(studio[\w.]*)", path.read_text(), re.M):
            assert module == "studio.extension_api", f"{path.relative_to(ROOT)} imports {module}"
