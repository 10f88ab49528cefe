"""Infotext as A1111 reads it: Version that keeps its back-compat flags off, RNG, steps of interrupted images."""
from __future__ import annotations

import re

import numpy as np
import pytest
from packaging import version as pv

from studio.errors import StudioError
from studio.infotext import params_to_request_fields, parse_infotext
from studio.request import GenerationRequest

TINY = dict(width=64, height=64, steps=3, cfg_scale=5.0, prompt="a [red:blue:0.5] cube", negative_prompt="blurry",
            seed=7, sampler_name="DDIM")


def a1111_backcompat(d: dict) -> dict:
    """A1111 modules/infotext_versions.py (parse_version + backcompat, auto_backcompat on), re-written from it:
    the flags A1111 switches on for a pasted text, by its Version."""
    text = d.get("Version")
    ver = None
    if text is not None:
        m = re.match(r"([^-]+-[^-]+)-.*", text)
        if m:
            text = m.group(1)
        try:
            ver = pv.parse(text)
        except Exception:  # noqa: BLE001 - A1111 catches everything here
            ver = None
    flags = {}
    if ver is None:
        return flags
    if ver < pv.parse("1.6.0") and "[" in d.get("Prompt", ""):
        flags["Old prompt editing timelines"] = True
    if ver < pv.parse("1.6.0") and d.get("Sampler", "") in ("DDIM", "PLMS"):
        flags["Pad conds v0"] = True
    if ver < pv.parse("v1.7.0-225"):
        flags["Downcast alphas_cumprod"] = True
    if ver < pv.parse("1.8.0") and d.get("Refiner"):
        flags["Refiner switch by sampling steps"] = True
    return flags


def _params(text: str) -> dict:
    last = text.strip().split("\n")[-1]
    return {k: v for k, v in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last)}


def test_studio_version_switches_no_a1111_backcompat_flag(studio):
    res = studio.generate(GenerationRequest(**TINY))
    text = res.infotexts[0]
    params = _params(text)
    assert params["Version"] == "studio-0.1.0"
    parsed = {**params, "Prompt": TINY["prompt"], "Sampler": "DDIM"}
    assert a1111_backcompat(parsed) == {}
    # what a bare "0.1.0" did: every flag on for this prompt and sampler
    assert set(a1111_backcompat({**parsed, "Version": "0.1.0"})) == {
        "Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod"}
    assert a1111_backcompat({**parsed, "Version": "v1.10.1"}) == {}
    # the studio's own parser agrees
    assert not any(k in parse_infotext(text) for k in ("Downcast alphas_cumprod", "Pad conds v0"))


def test_cpu_noise_is_written_and_gpu_on_a_cpu_device_is_the_same_noise(studio):
    cpu = studio.generate(GenerationRequest(**TINY))
    assert "RNG: CPU" in cpu.infotexts[0]
    dev = studio.generate(GenerationRequest(**TINY, rng="GPU"))
    assert np.array_equal(np.asarray(cpu.images[0]), np.asarray(dev.images[0]))
    assert "RNG: CPU" in dev.infotexts[0]   # the device is the CPU: the noise came from the CPU


def test_rng_choice_picks_the_noise_device(studio):
    eng = studio.engine
    eng.manager.device = "meta"   # a stand-in for a GPU: only the chosen device is checked
    assert eng.noise_device(GenerationRequest(rng="GPU")).type == "meta"
    assert eng.noise_device(GenerationRequest(rng="CPU")).type == "cpu"
    assert eng.noise_device(GenerationRequest()).type == "cpu"                      # setting rng = "cpu"
    eng.settings = eng.settings.replace(rng="device")
    assert eng.noise_device(GenerationRequest()).type == "meta"


def test_pasted_rng_parses_to_the_setting():
    assert params_to_request_fields(parse_infotext("a\nSteps: 2, Seed: 1, Size: 64x64, RNG: CPU"))["rng"] == "CPU"
    assert params_to_request_fields(parse_infotext("a\nSteps: 2, Seed: 1, Size: 64x64"))["rng"] == "GPU"
    fields = params_to_request_fields(parse_infotext("a\nSteps: 2, Seed: 1, Size: 64x64, RNG: NV"))
    with pytest.raises(StudioError) as err:
        GenerationRequest(**fields).validate()
    assert err.value.field == "rng" and "NV" in str(err.value)


def test_api_randn_source_option_override_and_infotext(studio, tmp_path):
    from studio.api.convert import to_request
    from studio.api.models import Txt2ImgRequest
    from studio.api.options import OptionsStore

    options = OptionsStore(tmp_path)
    assert to_request(Txt2ImgRequest(prompt="a"), studio, options)[0].rng == ""
    options.update({"randn_source": "GPU"})
    assert to_request(Txt2ImgRequest(prompt="a"), studio, options)[0].rng == "GPU"
    body = Txt2ImgRequest(prompt="a", override_settings={"randn_source": "CPU"})
    request, notes = to_request(body, studio, options)
    assert request.rng == "CPU" and not any("randn_source" in n for n in notes)
    pasted = Txt2ImgRequest(infotext="a\nSteps: 2, Seed: 1, Size: 64x64, RNG: CPU")
    assert to_request(pasted, studio, options)[0].rng == "CPU"
    with pytest.raises(StudioError) as err:
        to_request(Txt2ImgRequest(prompt="a", override_settings={"randn_source": "NV"}), studio, options)
    assert err.value.field == "override_settings.randn_source"


class _StopAfter:
    """A job context that asks for an interrupt once ``n`` steps have run."""

    job_id = ""
    skipped = False

    def __init__(self, n: int):
        self.n, self.interrupted = n, False

    def set_progress(self, step, total, **kw):
        if step >= self.n:
            self.interrupted = True

    def set_preview(self, obj): ...
    def clear_skip(self): ...


def test_interrupted_image_writes_the_steps_it_ran(studio):
    res = studio.engine.generate(GenerationRequest(**{**TINY, "steps": 6, "sampler_name": "Euler"}), _StopAfter(2))
    assert res.interrupted and len(res.images) == 1
    assert _params(res.infotexts[0])["Steps"] == "2"
    full = studio.generate(GenerationRequest(**{**TINY, "steps": 6, "sampler_name": "Euler"}))
    assert _params(full.infotexts[0])["Steps"] == "6"


def test_interrupted_hires_first_pass_gives_an_image_with_its_steps(studio):
    request = GenerationRequest(**{**TINY, "steps": 5, "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2})
    res = studio.engine.generate(request, _StopAfter(3))
    assert res.interrupted and res.images[0].size == (64, 64)
    assert _params(res.infotexts[0])["Steps"] == "3" and "Hires upscale" not in res.infotexts[0]
