"""Extension hooks in the engine: request adjustment, per-step, after image, saved, model loaded; isolation."""
from __future__ import annotations

import shutil
import sys

import pytest

from studio.errors import StudioError
from studio.request import GenerationRequest

FIXTURE = __import__("pathlib").Path(__file__).parent / "extensions_fixture"
BASE = dict(width=64, height=64, steps=3, seed=1, prompt="a cube", sampler_name="Euler")


@pytest.fixture()
def ext_studio(settings, tmp_path):
    from studio.app import Studio

    root = tmp_path / "extensions"
    shutil.copytree(FIXTURE, root)
    s = Studio(settings.replace(extensions_dir=str(root)))
    calls = sys.modules["studio_extension_stub"].CALLS
    calls.clear()
    yield s, calls
    s.close()


def test_every_engine_hook_runs(ext_studio):
    studio, calls = ext_studio
    res = studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube [stub-steps]"}))
    assert res.request.steps == 2 and res.request.prompt == "a cube"        # adjusted request ran
    assert ("studio_on_step", 1, 2) in calls and ("studio_on_step", 2, 2) in calls
    assert "Stub: seed 1" in res.infotexts[0] and res.infotexts[0].rstrip().endswith("Version: studio-0.1.0")
    assert ("studio_image_saved", res.paths[0]) in calls
    assert any(c[0] == "studio_model_loaded" and c[2] == "sd1" for c in calls if isinstance(c, tuple))
    assert "Stub nearest" in studio.engine.upscalers.names()


def test_step_hook_can_stop_the_job(ext_studio):
    studio, calls = ext_studio
    res = studio.generate(GenerationRequest(**{**BASE, "prompt": "stop-early", "steps": 10, "n_iter": 2}))
    assert res.interrupted and len(res.images) == 1
    assert max(c[1] for c in calls if isinstance(c, tuple) and c[0] == "studio_on_step") == 2


def test_broken_extension_is_isolated_and_reported(ext_studio):
    studio, _ = ext_studio
    res = studio.generate(GenerationRequest(**BASE))
    assert len(res.images) == 1                                              # the job went on
    broken = studio.extensions.extensions["broken"]
    assert broken.status == "loaded" and any("exploded" in e for e in broken.errors)
    bad = studio.extensions.extensions["badhook"]
    assert bad.status == "error" and any("studio_no_such_hook" in e for e in bad.errors)


def test_failing_request_hook_fails_the_job_naming_the_extension(ext_studio, tmp_path):
    studio, _ = ext_studio
    from studio.extension_api import hookimpl

    class Failing:
        @hookimpl
        def studio_adjust_request(self, api, request):
            raise KeyError("no such thing")

    studio.extensions.pm.register(Failing(), name="failing-ext")
    with pytest.raises(StudioError) as err:
        studio.generate(GenerationRequest(**BASE))
    assert "failing-ext" in str(err.value)


def test_enable_disable_persists(ext_studio, settings, tmp_path):
    studio, _ = ext_studio
    studio.extensions.set_enabled("stub", False)
    from studio.extensions import ExtensionManager
    again = ExtensionManager(studio.extensions.roots, studio.extensions.state_file)
    again.load_all()
    assert again.extensions["stub"].status == "disabled" and not again.extensions["stub"].enabled
    again.set_enabled("stub", True)
    assert ExtensionManager(studio.extensions.roots, studio.extensions.state_file).discover()[-1].enabled
