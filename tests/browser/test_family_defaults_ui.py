"""In a real browser: picking a FLUX.1 checkpoint moves every tab's sampler, steps, CFG, distilled guidance and
size to FLUX's values (Forge's preset); a value the user set stays; back on SD 1.5 the fields FLUX set return."""
from __future__ import annotations

import shutil

import pytest

from tests.browser.conftest import RunningServer, make_settings, open_app, server_args
from tests.browser.test_merge_ui import pick
from tests.browser.test_txt2img_ui import TIMEOUT, set_slider

SD1, FLUX = "tiny-sd1.safetensors", "flux1-dev-tiny.safetensors"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from studio.app import Studio
    from tests import tinymodels
    from tests.tinyflux import make_tiny_flux, write_flux_single_file
    from webui.server import build_app
    root = tmp_path_factory.mktemp("ui-families")
    ckpt = root / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=0), ckpt / SD1)
    write_flux_single_file(make_tiny_flux(seed=1, guidance=True), ckpt / FLUX)
    studio = Studio(make_settings(root, root / "models", default_checkpoint=SD1))
    server = RunningServer(build_app(studio, server_args()))
    yield server.url, studio
    server.stop()
    studio.queue.interrupt()
    studio.close()
    shutil.rmtree(root, ignore_errors=True)


def wait_value(page, elem_id: str, value) -> None:
    """Wait until a slider's number box or a dropdown's box shows ``value``."""
    page.wait_for_function(
        "([id, v]) => { const e = document.querySelector(`#${id} input[type=number]`) || "
        "document.querySelector(`#${id} input[role=combobox]`); return e && String(e.value) === String(v); }",
        arg=[elem_id, value], timeout=TIMEOUT)


def test_fields_follow_the_checkpoints_family(browser, mixed, shoot):
    url, studio = mixed
    page = open_app(browser, url)
    try:
        for elem_id, value in (("txt2img_cfg", 7), ("txt2img_sampling", "DPM++ 2M"), ("txt2img_width", 512)):
            wait_value(page, elem_id, value)
        set_slider(page, "txt2img_steps", 33)                 # the user's own choice

        pick(page, "setting_sd_model_checkpoint", FLUX)
        for elem_id, value in (("txt2img_cfg", 1), ("txt2img_distilled_cfg", 3.5), ("txt2img_sampling", "Euler"),
                               ("txt2img_scheduler", "Simple"), ("txt2img_width", 1024), ("txt2img_height", 1024)):
            wait_value(page, elem_id, value)
        assert page.locator("#txt2img_steps input[type=number]").input_value() == "33"
        shoot(page, "family-defaults-flux")
        page.get_by_role("tab", name="img2img", exact=True).click()
        for elem_id, value in (("img2img_cfg", 1), ("img2img_sampling", "Euler"), ("img2img_steps", 20)):
            wait_value(page, elem_id, value)

        page.get_by_role("tab", name="txt2img", exact=True).click()
        pick(page, "setting_sd_model_checkpoint", SD1)
        for elem_id, value in (("txt2img_cfg", 7), ("txt2img_sampling", "DPM++ 2M"), ("txt2img_width", 512),
                               ("txt2img_scheduler", "Automatic")):
            wait_value(page, elem_id, value)
        assert page.locator("#txt2img_steps input[type=number]").input_value() == "33"
    finally:
        page.context.close()
