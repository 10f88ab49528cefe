"""ControlNet in a real browser: the ControlNet tab (upload, canny preview, generate with the tiny ControlNet from
conftest), the accordion on txt2img, and PNG Info restoring the units."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from tests.browser.conftest import CONTROLNET_NAME
from tests.browser.test_img2img_ui import last_result, open_tab
from tests.browser.test_txt2img_ui import set_slider

TIMEOUT = 120_000  # generous: a busy machine is slow, and a wait ends as soon as its condition holds
MODEL = CONTROLNET_NAME.rsplit(".", 1)[0]


def rectangle(path, size=(96, 64)):
    """Black rectangle on white: canny must find its outline and nothing else."""
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).rectangle((24, 16, 72, 48), fill="black")
    img.save(path)


def pick(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} input[role=combobox]")
    box.fill(text)
    box.press("Enter")
    page.wait_for_function(f"document.querySelector('#{elem_id} input[role=combobox]')?.value.includes('{text}')",
                           timeout=TIMEOUT)


def value_of(page, selector: str) -> str:
    return page.locator(selector).input_value()


def image_from(page, selector: str) -> Image.Image:
    """The picture an <img> shows, fetched by the page's own session."""
    src = page.locator(selector).get_attribute("src")
    response = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + "/" + src.lstrip("/"))
    assert response.ok, src
    return Image.open(io.BytesIO(response.body())).convert("L")


def test_controlnet_tab_preview_and_generate(page, live, tmp_path, shoot):
    rectangle(tmp_path / "rect.png")
    open_tab(page, "ControlNet")
    page.locator("#controlnet_cn_0_image input[type=file]").set_input_files(str(tmp_path / "rect.png"))
    # a dropped image enables its unit
    page.wait_for_function("document.querySelector('#controlnet_cn_0_enabled input')?.checked", timeout=TIMEOUT)
    page.locator("#controlnet_prompt textarea").fill("a box")
    for name, value in (("width", 64), ("height", 64), ("steps", 2)):
        set_slider(page, f"controlnet_{name}", value)

    # enabled without a model: a visible message naming the unit
    page.locator("#controlnet_generate").click()
    page.locator("#controlnet_error .studio-error").wait_for(timeout=TIMEOUT)
    assert "unit 0" in page.locator("#controlnet_error").inner_text()

    # canny: its thresholds appear with their labels, and the matching model is picked
    pick(page, "controlnet_cn_0_module", "canny")
    page.locator("#controlnet_cn_0_threshold_a").get_by_text("Canny Low Threshold").wait_for(timeout=TIMEOUT)
    assert value_of(page, "#controlnet_cn_0_threshold_a input[type=number]") == "100"
    page.wait_for_function("document.querySelector('#controlnet_cn_0_model input[role=combobox]')?.value"
                           f".startsWith('{MODEL}')", timeout=TIMEOUT)

    page.locator("#controlnet_cn_0_preview_button").click()
    page.locator("#controlnet_cn_0_preview img").wait_for(timeout=TIMEOUT)
    detected = np.asarray(image_from(page, "#controlnet_cn_0_preview img"))
    h, w = detected.shape
    assert (w, h) == (768, 512)                   # processor resolution 512: the short side, ×8 here
    edges = detected > 127
    # the rectangle (24..72, 16..48 of 96×64) is at 192..576 × 128..384: its outline, not its inside or the paper
    assert edges[120:136, 200:570].any(axis=0).mean() > 0.9 and edges[376:392, 200:570].any(axis=0).mean() > 0.9
    assert edges[136:376, 184:200].any(axis=1).mean() > 0.9 and edges[136:376, 568:584].any(axis=1).mean() > 0.9
    assert not edges[160:352, 224:544].any() and not edges[:100, :150].any()

    page.locator("#controlnet_generate").click()
    page.locator("#controlnet_gallery button.thumbnail-small").nth(1).wait_for(timeout=TIMEOUT)  # image + map
    assert "detected map" in page.locator("#controlnet_gallery").inner_text()
    page.locator("#controlnet_info .infotext").wait_for(timeout=TIMEOUT)
    text = page.locator("#controlnet_info").inner_text()
    assert "ControlNet 0:" in text and "Module: canny" in text and f"Model: {MODEL}" in text
    assert page.locator("#controlnet_error").inner_text().strip() == ""
    result = last_result(live[1])
    assert result.images[0].size == (64, 64) and len(result.control_maps) == 1
    shoot(page, "controlnet-tab")

    # the same units on txt2img, in an accordion
    open_tab(page, "txt2img")
    page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    page.locator("#txt2img_cn_0_image").wait_for(timeout=TIMEOUT)
    assert value_of(page, "#txt2img_cn_0_module input[role=combobox]") == "none"
    shoot(page, "txt2img-controlnet-accordion")


def test_png_info_restores_controlnet_units_in_txt2img(page, live, tmp_path):
    studio = live[1]
    from studio.controlnet import ControlUnit
    from studio.request import GenerationRequest
    rectangle(tmp_path / "rect.png")
    unit = ControlUnit(module="canny", model=MODEL, weight=0.6, image=Image.open(tmp_path / "rect.png"),
                       threshold_a=50, threshold_b=150, guidance_end=0.8, control_mode="ControlNet is more important")
    result = studio.generate(GenerationRequest(prompt="restored", width=64, height=64, steps=1,
                                               controlnet_units=(unit,)), timeout=120)
    assert "ControlNet 0" in result.infotexts[0]

    open_tab(page, "PNG Info")
    page.locator("#pnginfo_image input[type=file]").set_input_files(result.paths[0])
    page.wait_for_function("document.querySelector('#pnginfo_parameters textarea')?.value.includes('ControlNet 0')",
                           timeout=TIMEOUT)
    page.locator("#pnginfo_send_txt2img").click()
    page.wait_for_function("document.querySelector('#txt2img_cn_0_module input[role=combobox]')?.value === 'canny'",
                           timeout=TIMEOUT)
    assert page.locator("#txt2img_cn_0_enabled input").is_checked()
    assert value_of(page, "#txt2img_cn_0_model input[role=combobox]").startswith(MODEL)
    assert value_of(page, "#txt2img_cn_0_weight input[type=number]") == "0.6"
    assert value_of(page, "#txt2img_cn_0_threshold_a input[type=number]") == "50"
    assert value_of(page, "#txt2img_cn_0_guidance_end input[type=number]") == "0.8"
    assert page.locator("#txt2img_cn_0_control_mode input[value='ControlNet is more important']").is_checked()
    page.locator("#txt2img_cn_tabs").get_by_role("tab", name="ControlNet Unit 1").click()
    assert not page.locator("#txt2img_cn_1_enabled input").is_checked()   # units the text lacks are off

    # "Send to ControlNet": the image goes into unit 0, the units and the prompt come along
    open_tab(page, "PNG Info")
    page.locator("#pnginfo_send_controlnet").click()
    page.wait_for_function("document.querySelector('#controlnet_cn_0_module input[role=combobox]')?.value === "
                           "'canny'", timeout=TIMEOUT)
    page.locator("#controlnet_cn_0_image img").wait_for(timeout=TIMEOUT)
    assert page.locator("#controlnet_cn_0_enabled input").is_checked()
    assert value_of(page, "#controlnet_prompt textarea") == "restored"
    assert value_of(page, "#controlnet_cn_0_threshold_b input[type=number]") == "150"
