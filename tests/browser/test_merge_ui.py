"""The Merge tab in a real browser: merge two checkpoints, load the result, generate with it; resize a LoRA.

Own server and model folder: merging writes new files, which the session's shared server must not see.
"""
from __future__ import annotations

import pytest

from tests.browser.conftest import DEMO_NAME, RunningServer, make_settings, open_app, server_args

TIMEOUT = 120_000  # generous: a busy machine is slow, and a wait ends as soon as its condition holds


@pytest.fixture(scope="module")
def merge_live(tmp_path_factory):
    from studio.app import Studio
    from tests import lorafiles, tinymodels
    from webui.server import build_app

    root = tmp_path_factory.mktemp("ui-merge")
    ckpt = root / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    tiny = tinymodels.make_tiny("sd1", seed=0)
    tinymodels.write_single_file(tiny, ckpt / DEMO_NAME)
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=1), ckpt / "tiny-b.safetensors")
    tensors, _ = lorafiles.kohya_lora(tiny, seed=3, rank=4)
    lorafiles.write(root / "models" / "Lora" / "tiny-lora.safetensors", tensors, lorafiles.metadata_for(tiny))
    studio = Studio(make_settings(root, root / "models", default_checkpoint=DEMO_NAME))
    server = RunningServer(build_app(studio, server_args()))
    yield server.url, studio
    server.stop()
    studio.queue.interrupt()
    studio.close()


def pick(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} input[role=combobox]")
    box.click()
    box.fill(text)
    page.get_by_role("option").filter(has_text=text).first.click()  # Enter alone keeps the typed text only
    page.wait_for_function(f"document.querySelector('#{elem_id} input[role=combobox]')?.value.includes('{text}')",
                           timeout=TIMEOUT)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_merge_load_and_generate(browser, merge_live, shoot):
    url, studio = merge_live
    page = open_app(browser, url)
    try:
        page.get_by_role("tab", name="Merge", exact=True).click()
        # nothing chosen: the error names the field
        page.locator("#merge_run").click()
        page.locator("#merge_error .studio-error").wait_for(timeout=TIMEOUT)
        assert "Primary model (A)" in page.locator("#merge_error").inner_text()

        pick(page, "merge_model_a", "demo-untrained")
        pick(page, "merge_model_b", "tiny-b")
        set_number(page, "merge_multiplier", 0.3)
        page.locator("#merge_output_name textarea").fill("merged-test")
        page.locator("#merge_run").click()
        page.locator("#merge_result .merge-done").wait_for(timeout=TIMEOUT)
        assert "merged-test.safetensors" in page.locator("#merge_result").inner_text()
        assert page.locator("#merge_error").inner_text().strip() == ""
        assert (studio.settings.ckpt_path / "merged-test.safetensors").is_file()
        page.locator("#merge_blocks").get_by_text("Block weights (one multiplier").click()  # open it for the shot
        page.locator("#merge_block_preset input[role=combobox]").wait_for(timeout=TIMEOUT)
        pick(page, "merge_block_preset", "GRAD_V")
        page.wait_for_function("document.querySelector('#merge_block_weights input')?.value.startsWith('1,')",
                               timeout=TIMEOUT)
        assert page.locator("#merge_use_blocks input").is_checked()  # picking a preset turns block weights on
        assert page.locator("#merge_model_a input[role=combobox]").input_value().startswith("demo-untrained")
        shoot(page, "merge-checkpoints")

        # the new model is in the checkpoint list above the tabs at once
        page.locator("#setting_sd_model_checkpoint input[role=combobox]").click()
        page.get_by_role("option", name="merged-test", exact=False).first.wait_for(timeout=TIMEOUT)
        page.keyboard.press("Escape")

        page.locator("#merge_load").click()
        page.wait_for_function("document.querySelector('#setting_sd_model_checkpoint input[role=combobox]')"
                               ".value.startsWith('merged-test')", timeout=TIMEOUT)
        assert studio.manager.current.name == "merged-test.safetensors"

        page.get_by_role("tab", name="txt2img", exact=True).click()
        page.locator("#txt2img_prompt textarea").fill("a merged lighthouse")
        for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 2)):
            set_number(page, elem_id, value)
        page.locator("#txt2img_generate").click()
        page.locator("#txt2img_info .infotext").wait_for(timeout=TIMEOUT)
        assert "Model: merged-test" in page.locator("#txt2img_info .infotext").inner_text()
    finally:
        page.context.close()


def test_lora_resize_reports_energy(browser, merge_live, shoot):
    url, studio = merge_live
    page = open_app(browser, url)
    try:
        page.get_by_role("tab", name="Merge", exact=True).click()
        page.get_by_role("tab", name="LoRA", exact=True).click()
        page.get_by_role("tab", name="Resize", exact=True).click()
        pick(page, "merge_resize_lora", "tiny-lora")
        set_number(page, "merge_resize_rank", 2)
        page.locator("#merge_resize_output_name textarea").fill("tiny-lora-r2")
        page.locator("#merge_resize_run").click()
        page.locator("#merge_resize_result .merge-energy").wait_for(timeout=TIMEOUT)
        assert "Kept energy overall" in page.locator("#merge_resize_result").inner_text()
        assert studio.loras.find("tiny-lora-r2") is not None   # in the extra-networks list at once
        shoot(page, "merge-lora")
    finally:
        page.context.close()
