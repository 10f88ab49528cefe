"""PNG Info, Settings and the no-checkpoint help in a real browser."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.browser.conftest import DEMO_NAME, RunningServer, open_app, server_args
from webui.server import build_app

TIMEOUT = 120_000  # generous: a busy machine is slow, and a wait ends as soon as its condition holds
A1111_TEXT = ("masterpiece, a castle on a hill, (sunset:1.2)\n"
              "Negative prompt: lowres, bad anatomy\n"
              "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, "
              "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Version: v1.10.1")


def value_of(page, selector: str) -> str:
    return page.locator(selector).input_value()


def upload_to_png_info(page, path) -> None:
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(path))
    page.wait_for_function("document.querySelector('#pnginfo_parameters textarea')?.value.length > 0",
                           timeout=TIMEOUT)


def test_png_info_reads_our_png_and_sends_every_field(page, live, shoot):
    from studio.request import GenerationRequest
    studio = live[1]
    result = studio.generate(GenerationRequest(prompt="a lighthouse at night", negative_prompt="fog",
                                               steps=2, width=64, height=72, seed=4242, cfg_scale=5.5,
                                               sampler_name="Euler a", clip_skip=2), timeout=120)
    upload_to_png_info(page, result.paths[0])
    assert "Seed: 4242" in value_of(page, "#pnginfo_parameters textarea")
    assert "4242" in page.locator("#pnginfo_table").inner_text()
    shoot(page, "png-info")
    page.locator("#pnginfo_send_txt2img").click()
    page.locator("#txt2img_prompt textarea").wait_for(state="visible", timeout=TIMEOUT)
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value === 'a lighthouse at night'",
                           timeout=TIMEOUT)
    assert value_of(page, "#txt2img_neg_prompt textarea") == "fog"
    assert value_of(page, "#txt2img_seed input") == "4242"
    assert value_of(page, "#txt2img_steps input[type=number]") == "2"
    assert value_of(page, "#txt2img_height input[type=number]") == "72"
    assert value_of(page, "#txt2img_cfg input[type=number]") == "5.5"
    assert value_of(page, "#txt2img_clip_skip input[type=number]") == "2"
    assert value_of(page, "#txt2img_sampling input[role=combobox]") == "Euler a"


def test_png_info_reads_an_a1111_png(page, tmp_path):
    path = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    Image.new("RGB", (32, 48), (200, 120, 40)).save(path, pnginfo=info)
    upload_to_png_info(page, path)
    page.locator("#pnginfo_send_txt2img").click()
    page.wait_for_function("document.querySelector('#txt2img_seed input') && "
                           "document.querySelector('#txt2img_seed input')?.value === '3141592653'", timeout=TIMEOUT)
    assert value_of(page, "#txt2img_prompt textarea").startswith("masterpiece, a castle")
    assert value_of(page, "#txt2img_sampling input[role=combobox]") == "DPM++ 2M"
    assert value_of(page, "#txt2img_scheduler input[role=combobox]") == "Karras"
    assert value_of(page, "#txt2img_width input[type=number]") == "512"
    assert value_of(page, "#txt2img_height input[type=number]") == "768"
    # the model is not here: the page says so and keeps the current checkpoint
    page.get_by_role("tab", name="PNG Info").click()
    assert "v1-5-pruned-emaonly" in page.locator("#pnginfo_message").inner_text()


def test_settings_tab_shows_the_running_setup(page, shoot):
    page.get_by_role("tab", name="Settings").click()
    page.locator("#settings_save").wait_for(timeout=TIMEOUT)
    assert "cpu" in page.locator("#settings_status").inner_text()
    shoot(page, "settings")


@pytest.fixture(scope="module")
def empty_live(empty_studio):
    server = RunningServer(build_app(empty_studio, server_args()))
    yield server.url, empty_studio
    server.stop()


def test_without_a_checkpoint_every_tab_says_how_to_add_one(browser, empty_live, demo_models, shoot):
    url, studio = empty_live
    page = open_app(browser, url)
    try:
        for name in ("txt2img", "PNG Info", "Settings"):
            page.get_by_role("tab", name=name).click()
            help_box = page.locator(".no-checkpoint:visible")
            help_box.first.wait_for(timeout=TIMEOUT)
            text = help_box.first.inner_text()
            assert "--ckpt-dir" in text and "launch.py --demo" in text and "Hugging Face" in text
        page.get_by_role("tab", name="txt2img").click()
        shoot(page, "txt2img-no-checkpoint")
        # drop a file into the folder and press refresh: it is listed and the help goes away
        studio.settings.ckpt_path.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_models / "Stable-diffusion" / DEMO_NAME, studio.settings.ckpt_path / "dropped.safetensors")
        page.locator("#refresh_sd_model_checkpoint").click()
        page.wait_for_function("document.querySelector('#setting_sd_model_checkpoint input')?.value"
                               ".startsWith('dropped.safetensors')", timeout=TIMEOUT)
        page.locator(".no-checkpoint:visible").first.wait_for(state="detached", timeout=TIMEOUT)
    finally:
        page.context.close()


def test_settings_save_applies_live_values_and_names_restart_ones(browser, empty_live):
    url, studio = empty_live
    page = open_app(browser, url)
    try:
        page.get_by_role("tab", name="Settings").click()
        message = page.locator("#settings_message")
        for _ in range(3):
            # on a busy machine a typed number can miss the component's state before Save is clicked (the box
            # shows it, the click sends the old value): type both again and save again until the save saw it
            box = page.locator("#setting_preview_every input")
            box.fill("3")
            box.press("Enter")
            device = page.locator("#setting_device input[role=combobox]")
            device.fill("cpu")
            device.press("Enter")
            page.locator("#settings_save").click()
            try:
                page.wait_for_function("document.querySelector('#settings_message')?.innerText"
                                       ".includes('preview_every')", timeout=TIMEOUT // 4)
                break
            except Exception:   # saved without it (or not yet): type and save again
                continue
        assert "preview_every" in message.inner_text() and "Restart the studio" in message.inner_text()
        saved = json.loads(studio.settings.settings_file.read_text())
        assert saved["preview_every"] == 3 and saved["device"] == "cpu"
        assert studio.settings.preview_every == 3       # applied now
        assert studio.settings.device == "auto"         # needs a restart
        # a bad value is refused with a message naming it; nothing is written
        page.locator("#setting_offload input[role=combobox]").fill("turbo")
        page.locator("#setting_offload input[role=combobox]").press("Enter")
        page.locator("#settings_save").click()
        page.wait_for_function("document.querySelector('#settings_message')?.innerText.includes('offload')",
                               timeout=TIMEOUT)
        assert "Not saved" in message.inner_text()
        assert json.loads(studio.settings.settings_file.read_text())["offload"] == "none"
    finally:
        page.context.close()
