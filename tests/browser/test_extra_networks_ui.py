"""The Extra networks panel in a real browser: cards after Refresh, search, click adds the tag, generate."""
from __future__ import annotations

import shutil

import pytest
from PIL import Image

from webui.extra_networks import toggle_tag

TIMEOUT = 120_000  # generous: a busy machine is slow, and a wait ends as soon as its condition holds
LORAS = "#txt2img_extra_lora_cards"


@pytest.fixture(scope="module")
def networks(live):
    """Two SD1 LoRAs (one with a preview), one claiming SDXL, and a 2-vector embedding, written into the live
    server's folders after it started (so the panel only shows them after Refresh)."""
    import torch

    from tests import lorafiles, tinymodels
    settings = live[1].settings
    lora_dir, emb_dir = settings.lora_path, settings.embeddings_path
    c = tinymodels.make_tiny("sd1", seed=0)
    tags = {"pixel_style": {"10_px": {"pixelart": 5, "retro": 2}}, "watercolor": {"5_wc": {"wash": 3}}}
    for i, (name, freq) in enumerate(tags.items()):
        sd, _ = lorafiles.kohya_lora(c, seed=i + 1)
        lorafiles.write(lora_dir / f"{name}.safetensors", sd, lorafiles.metadata_for(c, ss_tag_frequency=freq))
    sd, _ = lorafiles.kohya_lora(c, seed=9)
    lorafiles.write(lora_dir / "xl_only.safetensors", sd,
                    {**lorafiles.metadata_for(c), "ss_base_model_version": "sdxl_base_v1-0"})
    gradient = Image.linear_gradient("L").resize((96, 96)).convert("RGB")
    Image.merge("RGB", (gradient.getchannel(0), gradient.rotate(90).getchannel(0), gradient.getchannel(0))) \
        .save(lora_dir / "pixel_style.preview.png")
    emb_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}}, emb_dir / "shiny.pt")
    yield live
    shutil.rmtree(lora_dir, ignore_errors=True)
    (emb_dir / "shiny.pt").unlink(missing_ok=True)
    live[1].loras.refresh()
    live[1].embeddings.refresh()


def test_toggle_tag_adds_and_removes():
    assert toggle_tag("", "<lora:a:1>") == "<lora:a:1>"
    assert toggle_tag("a cat", "<lora:a:1>") == "a cat <lora:a:1>"
    assert toggle_tag("a cat <lora:a:0.5>, dog", "<lora:a:1>") == "a cat, dog"
    assert toggle_tag("a cat, shiny", "shiny") == "a cat"
    assert toggle_tag("shinystone", "shiny") == "shinystone shiny"


def card(page, name: str, root: str = LORAS):
    return page.locator(f"{root} .en-card[data-name='{name}']")


def visible_names(page, root: str = LORAS) -> list[str]:
    return page.eval_on_selector_all(f"{root} .en-card", "cs => cs.filter(c => c.offsetParent).map(c => "
                                                         "c.dataset.name)")


def prompt(page) -> str:
    return page.locator("#txt2img_prompt textarea").input_value()


def test_cards_search_click_and_generate(networks, page, shoot):
    # opening re-renders from the current list; let that answer arrive before Refresh so it cannot land last
    with page.expect_response(lambda r: "/run/predict" in r.url, timeout=TIMEOUT):
        page.locator("#txt2img_extra_networks").get_by_text("Extra networks").first.click()
    refresh = page.locator("#txt2img_extra_refresh")
    refresh.click()
    card(page, "pixel_style").wait_for(timeout=TIMEOUT)
    assert visible_names(page) == ["pixel_style", "watercolor", "xl_only"]
    pixel = card(page, "pixel_style")
    assert "pixelart" in pixel.inner_text() and "SD1" in pixel.inner_text()
    assert pixel.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")
    assert card(page, "watercolor").locator("img").count() == 0
    assert "wash" in card(page, "watercolor").inner_text()

    search = page.locator("#txt2img_extra_search :is(textarea, input)").first
    search.fill("retro")                 # a trigger word of pixel_style only
    page.wait_for_function(f"[...document.querySelectorAll(\"{LORAS} .en-card\")].filter(c => c.offsetParent)"
                           ".length === 1", timeout=TIMEOUT)
    assert visible_names(page) == ["pixel_style"]
    search.fill("")
    page.wait_for_function(f"[...document.querySelectorAll(\"{LORAS} .en-card\")].filter(c => c.offsetParent)"
                           ".length === 3", timeout=TIMEOUT)

    page.locator("#txt2img_prompt textarea").fill("a castle")
    pixel.click()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value.includes('<lora:')",
                           timeout=TIMEOUT)
    assert prompt(page) == "a castle <lora:pixel_style:1>"

    page.locator("#txt2img_extra_networks").get_by_role("tab", name="Textual Inversion").click()
    shiny = card(page, "shiny", "#txt2img_extra_ti_cards")
    shiny.wait_for(timeout=TIMEOUT)
    assert "2 vectors" in shiny.inner_text()
    shiny.click()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value.endsWith(' shiny')",
                           timeout=TIMEOUT)

    for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 2)):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_info .infotext").wait_for(timeout=TIMEOUT)
    info = page.locator("#txt2img_info .infotext").inner_text()
    assert "<lora:pixel_style:1>" in info and 'Lora hashes: "pixel_style: ' in info
    assert 'TI hashes: "shiny: ' in info

    # the model is in memory now: the embedding shows that it fits, the SDXL-tagged LoRA warns
    refresh.click()
    shiny.locator(".en-ok").wait_for(timeout=TIMEOUT)
    shoot(page, "extra-networks-ti")
    page.locator("#txt2img_extra_networks").get_by_role("tab", name="Lora", exact=True).click()
    warn = card(page, "xl_only").locator(".en-warn")
    warn.wait_for(timeout=TIMEOUT)
    assert "SDXL" in warn.inner_text()
    card(page, "xl_only").scroll_into_view_if_needed()
    page.evaluate("window.scrollTo(0, 0)")
    shoot(page, "extra-networks")


@pytest.mark.parametrize("tab,label", [("img2img", "img2img"), ("inpaint", "Inpaint")])
def test_panel_in_image_tabs_adds_to_their_own_prompt(networks, page, tab, label):
    page.get_by_role("tab", name=label, exact=True).click()
    with page.expect_response(lambda r: "/run/predict" in r.url, timeout=TIMEOUT):
        page.locator(f"#{tab}_extra_networks").get_by_text("Extra networks").first.click()
    page.locator(f"#{tab}_extra_refresh").click()
    card(page, "watercolor", f"#{tab}_extra_lora_cards").click()
    page.wait_for_function(f"document.querySelector('#{tab}_prompt textarea')?.value === '<lora:watercolor:1>'",
                           timeout=TIMEOUT)
    assert prompt(page) == ""          # the txt2img prompt is untouched
