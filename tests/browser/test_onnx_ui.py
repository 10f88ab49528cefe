"""The Settings tab's "Export current checkpoint to ONNX" button in a real browser."""
from __future__ import annotations

import pytest

from tests.browser.conftest import DEMO_NAME

pytest.importorskip("onnxruntime")

TIMEOUT = 300_000   # an export takes ~30 s here, more on a busy machine


def test_export_button_writes_the_current_checkpoint(page, live, shoot):
    page.get_by_role("tab", name="Settings").click()
    page.locator("#settings_onnx_export").click()
    page.wait_for_function("document.querySelector('#settings_onnx_message')?.innerText.includes('Exported')",
                           timeout=TIMEOUT)
    text = page.locator("#settings_onnx_message").inner_text()
    assert DEMO_NAME in text and "MB" in text
    page.locator("#settings_onnx_export").scroll_into_view_if_needed()
    shoot(page, "settings-speed")
    studio = live[1]
    assert any((p / "unet" / "model.onnx").is_file() for p in studio.settings.onnx_path.iterdir())
