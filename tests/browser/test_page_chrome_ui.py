"""The page's frame in a real browser: icons that ship with the app (no emoji font needed), an error that does
not push the page down."""
from __future__ import annotations

import io
import re

from PIL import Image

TIMEOUT = 60_000
ICON_BUTTONS = ("refresh_sd_model_checkpoint", "txt2img_random_seed", "txt2img_reuse_seed", "txt2img_open_folder")
# emoji and pictograph blocks: drawn as empty boxes where no emoji font is installed (as on this machine)
EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F]")


def test_icon_buttons_draw_shipped_svgs_and_keep_their_names(page, shoot):
    for elem_id in ICON_BUTTONS:
        button = page.locator(f"#{elem_id}")
        button.wait_for(timeout=TIMEOUT)
        info = page.evaluate("""(el) => { const before = getComputedStyle(el, '::before');
            return {mask: before.webkitMaskImage || before.maskImage, width: parseFloat(before.width),
                    name: el.getAttribute('aria-label') || el.textContent.trim(), title: el.title}; }""",
                             button.element_handle())
        assert info["mask"].startswith('url("data:image/svg+xml'), elem_id
        assert info["width"] >= 12, elem_id
        assert info["name"] and not EMOJI.search(info["name"]), elem_id   # a real accessible name
        # the icon is drawn: the button's middle has dark pixels on its light background
        shot = Image.open(io.BytesIO(button.screenshot())).convert("L")
        w, h = shot.size
        middle = shot.crop((w // 2 - 8, h // 2 - 8, w // 2 + 8, h // 2 + 8))
        assert min(middle.getdata()) < 110, f"{elem_id}: no icon drawn"
    assert page.locator("#refresh_sd_model_checkpoint").get_attribute("title") == "Refresh the model lists"
    texts = page.evaluate("() => [...document.querySelectorAll('button')].map((b) => b.textContent)")
    assert not [t for t in texts if EMOJI.search(t)], "a button still relies on an emoji font"
    shoot(page, "icon-buttons")


def test_an_error_overlays_the_page_instead_of_pushing_it_down(page, shoot):
    tabs = page.locator("#tabs")
    before = tabs.bounding_box()["y"]
    box = page.locator("#setting_sd_model_checkpoint input[role=combobox]")
    box.fill("no-such-model.safetensors")
    box.press("Enter")
    page.locator(".toast-wrap .toast-body, .toast-body").first.wait_for(timeout=TIMEOUT)
    page.locator("#quicksettings_status .studio-error").wait_for(timeout=TIMEOUT)
    page.wait_for_timeout(1000)     # the toast has faded in
    shoot(page, "error-toast")
    assert abs(tabs.bounding_box()["y"] - before) < 2
    # the message stays readable in place (it scrolls inside the status box)
    assert "no-such-model" in page.locator("#quicksettings_status").inner_text()
