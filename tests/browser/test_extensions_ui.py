"""The Extensions tab and the X/Y/Z plot tab (a built-in extension) in a real browser."""
from __future__ import annotations

from pathlib import Path

from tests.browser.test_txt2img_ui import set_slider

TIMEOUT = 120_000  # generous: a busy machine is slow, and a wait ends as soon as its condition holds


def test_extensions_tab_lists_the_builtins(page, shoot):
    page.get_by_role("tab", name="Extensions").click()
    table = page.locator("#extensions_list")
    table.wait_for(timeout=TIMEOUT)
    for name in ("xyz_plot", "prompts_from_file", "blueprint_lines"):
        row = table.locator(f"tr[data-extension='{name}']")
        assert row.locator(".ext-status").inner_text() == "loaded", name
    assert "takes effect after a UI reload / restart" in page.locator("#extensions_note").inner_text()
    assert table.locator("a[href^='file://']").count() >= 3
    shoot(page, "extensions-tab")


def test_xyz_plot_tab_makes_a_2x1_grid(page, live, shoot):
    studio = live[1]
    page.get_by_role("tab", name="X/Y/Z plot").click()
    page.locator("#xyz_prompt textarea").fill("a lighthouse")
    for elem_id, value in (("xyz_width", 64), ("xyz_height", 64), ("xyz_steps", 2)):
        set_slider(page, elem_id, value)
    page.locator("#xyz_x_values input").fill("11, 12")            # X: Seed (the default axis type)
    page.locator("#xyz_generate").click()
    thumbs = page.locator("#xyz_gallery button.thumbnail-item")
    thumbs.nth(2).wait_for(timeout=TIMEOUT)                         # the grid + two cells
    assert thumbs.count() == 3
    page.wait_for_function("document.querySelector('#xyz_status')?.innerText.includes('grid saved')",
                           timeout=TIMEOUT)
    grids = list((Path(studio.settings.outdir) / "txt2img-grids").rglob("*-grid.png"))
    assert grids
    assert "Seed: 11" in page.locator("#xyz_infotext textarea").input_value()
    thumbs.nth(0).click()                                           # the grid, large
    page.locator("#xyz_gallery button.thumbnail-small").nth(2).wait_for(timeout=TIMEOUT)
    shoot(page, "xyz-plot")
