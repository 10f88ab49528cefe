"""First run in a real browser: an empty models folder, one click installs the demo model, its note says what it
knows, the sliders move to its 64 px, and "a red circle on a blue background" shows one. The Train tab's Example
dataset button writes the held-out heart pictures and fills the fields that must match them."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.browser.conftest import RunningServer, make_settings, open_app, server_args
from tests.browser.test_train_ui import text_of, wait_text
from tests.browser.test_txt2img_ui import TIMEOUT, fill_prompt, set_slider, wait_for_images


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(url, studio) of a server whose models folder is empty, as on a fresh clone."""
    from studio.app import Studio
    from webui.server import build_app
    root = tmp_path_factory.mktemp("ui-firstrun")
    studio = Studio(make_settings(root, root / "models"))
    studio.warm_up()       # what the real server does once its port answers (the ML imports, before any click)
    server = RunningServer(build_app(studio, server_args()))
    yield server.url, studio
    server.stop()
    studio.close()


def value_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input[type=number]").input_value()


def test_install_demo_then_draw_a_red_circle(browser, fresh, shoot):
    from studio.demo_world import score
    url, studio = fresh
    page = open_app(browser, url)
    try:
        assert not studio.registry.checkpoints()
        assert not page.locator("#demo_model_note").is_visible()
        button = page.locator("#txt2img_install_demo")
        assert "Install the demo model" in button.inner_text() and "coloured shapes" in button.inner_text()
        shoot(page, "firstrun-empty")
        button.click()
        page.wait_for_function("document.querySelector('#setting_sd_model_checkpoint input')?.value"
                               ".startsWith('demo-shapes.safetensors')", timeout=TIMEOUT)
        installed = studio.settings.ckpt_path / "demo-shapes.safetensors"
        assert installed.is_file() and not installed.is_symlink()
        page.locator(".no-checkpoint:visible").first.wait_for(state="detached", timeout=TIMEOUT)
        note = page.locator("#demo_model_note")
        note.wait_for(state="visible", timeout=TIMEOUT)
        text = note.inner_text()
        assert "circle" in text and "purple" in text and "64" in text and "hearts" in text and "Train" in text
        # the sliders follow the model's declared native size (modelspec.resolution 64x64)
        page.wait_for_function("document.querySelector('#txt2img_width input[type=number]')?.value === '64'",
                               timeout=TIMEOUT)
        assert value_of(page, "txt2img_height") == "64"
        page.get_by_role("tab", name="img2img").click()
        page.wait_for_function("document.querySelector('#img2img_width input[type=number]')?.value === '64'",
                               timeout=TIMEOUT)
        page.get_by_role("tab", name="txt2img").click()
        fill_prompt(page, "a red circle on a blue background")
        page.locator("#txt2img_seed input").fill("7")
        page.locator("#txt2img_generate").click()
        wait_for_images(page, 1)
        page.wait_for_function("document.querySelector('#txt2img_info')?.innerText.includes('Size: 64x64')",
                               timeout=TIMEOUT)
        shoot(page, "firstrun-red-circle")
        saved = sorted((Path(studio.settings.outdir) / "txt2img-images").rglob("*.png"))
        assert len(saved) == 1
        with Image.open(saved[0]) as im:
            assert im.size == (64, 64)
            found = score(im.convert("RGB"))
        assert (found.shape, found.colour, found.background) == ("circle", "red", "blue"), found
        # a page opened now starts at the demo's size
        again = open_app(browser, url)
        try:
            again.wait_for_function("document.querySelector('#txt2img_width input[type=number]')?.value === '64'",
                                    timeout=TIMEOUT)
            assert again.locator("#demo_model_note").is_visible()
        finally:
            again.context.close()
    finally:
        page.context.close()


def test_sliders_go_back_to_512_for_a_model_without_a_native_size(browser, fresh):
    """Switching to a model that declares nothing restores the default only while the sliders hold the demo's 64;
    a size the user chose stays."""
    from tests import tinymodels
    url, studio = fresh
    from studio.demo import install_demo_model
    install_demo_model(studio.settings)
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=0), studio.settings.ckpt_path / "plain.safetensors")
    studio.registry.refresh()
    page = open_app(browser, url)
    try:
        page.locator("#refresh_sd_model_checkpoint").click()
        box = page.locator("#setting_sd_model_checkpoint input")
        box.wait_for(timeout=TIMEOUT)
        page.get_by_role("tab", name="img2img").click()
        set_slider(page, "img2img_width", 96)          # the user's own choice on img2img
        page.wait_for_function("document.querySelector('#img2img_width input[type=number]')?.value === '96'",
                               timeout=TIMEOUT)
        box.click()
        page.get_by_role("option", name="plain.safetensors").click()
        page.locator("#demo_model_note").wait_for(state="hidden", timeout=TIMEOUT)
        assert value_of(page, "img2img_width") == "96"
        page.get_by_role("tab", name="txt2img").click()
        page.wait_for_function("document.querySelector('#txt2img_width input[type=number]')?.value === '512'",
                               timeout=TIMEOUT)
        assert value_of(page, "txt2img_height") == "512"
        page.locator("#demo_model_note").wait_for(state="hidden", timeout=TIMEOUT)
    finally:
        page.context.close()


def test_example_dataset_button(browser, fresh, shoot):
    url, studio = fresh
    page = open_app(browser, url)
    try:
        page.get_by_role("tab", name="Train").click()
        page.locator("#train_example").click()
        wait_text(page, "train_import_report", "16 pictures of a heart")
        folder = studio.training.datasets_dir() / "example_heart"
        pictures = sorted((folder / "10_heart").glob("*.png"))
        assert len(pictures) == 16
        assert (folder / "10_heart" / "0000.txt").read_text().startswith("zkw, ")
        assert page.locator("#train_dataset_dir textarea, #train_dataset_dir input").first.input_value() == str(folder)
        page.locator("#train_buckets").get_by_text("Buckets and caption options").click()   # a closed accordion
        page.wait_for_function("document.querySelector('#train_resolution input')?.value === '64'", timeout=TIMEOUT)
        assert page.locator("#train_output_name textarea, #train_output_name input").first.input_value() == "heart_lora"
        assert page.locator("#train_sample_prompts textarea").input_value() == "zkw, a red heart on a blue background"
        assert page.locator("#train_trigger textarea, #train_trigger input").first.input_value() == "zkw"
        if any(i.name == "demo-shapes.safetensors" for i in studio.registry.checkpoints()):
            assert page.locator("#train_base_model input").input_value().startswith("demo-shapes.safetensors")
        assert "never seen" in text_of(page, "train_import_report")
        page.locator("#train_thumbs button.thumbnail-item, #train_thumbs img").first.wait_for(timeout=TIMEOUT)
        shoot(page, "firstrun-example-dataset")
    finally:
        page.context.close()
