"""img2img, Inpaint (a mask painted with the mouse), outpainting, hires fix and "Send to" in a real browser."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tests.browser.test_txt2img_ui import fill_prompt, set_slider, set_sliders, small

TIMEOUT = 120_000  # generous: a busy machine is slow, and a wait ends as soon as its condition holds


def picture(path, size=(64, 64)):
    """A test image with edges and colours (a flat one would hide resampling or lossy re-encoding)."""
    w, h = size
    img = Image.new("RGB", size, (40, 120, 200))
    d = ImageDraw.Draw(img)
    for x in range(0, w, 8):
        d.line((x, 0, x, h), fill=(60 + 3 * x % 190, 150, 90), width=2)
    d.rectangle((w // 4, h // 4, w // 2, h // 2), fill=(230, 200, 20))
    d.ellipse((w // 2, h // 2, w - 4, h - 4), fill=(200, 30, 60))
    img.save(path)
    return img


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).first.click()


def wait_for_images(page, prefix: str, count: int = 1) -> None:
    page.locator(f"#{prefix}_gallery button.thumbnail-small").nth(count - 1).wait_for(timeout=TIMEOUT)


def info_text(page, prefix: str) -> str:
    page.locator(f"#{prefix}_info .infotext").wait_for(timeout=TIMEOUT)
    return page.locator(f"#{prefix}_info").inner_text()


def last_result(studio):
    jobs = [j for j in studio.queue.history() if j.result is not None and getattr(j.result, "images", None)]
    return jobs[-1].result


def test_img2img_upload_and_generate(page, live, tmp_path, shoot):
    picture(tmp_path / "in.png", (96, 64))
    open_tab(page, "img2img")
    page.locator("#img2img_image input[type=file]").set_input_files(str(tmp_path / "in.png"))
    # W×H follow the uploaded image
    page.wait_for_function("document.querySelector('#img2img_width input[type=number]')?.value === '96'",
                           timeout=TIMEOUT)
    assert page.locator("#img2img_height input[type=number]").input_value() == "64"
    page.locator("#img2img_prompt textarea").fill("a tiled wall")
    set_slider(page, "img2img_steps", 3)
    page.locator("#img2img_seed input").fill("11")
    page.locator("#img2img_generate").click()
    wait_for_images(page, "img2img")
    text = info_text(page, "img2img")
    assert text.startswith("a tiled wall") and "Denoising strength: 0.75" in text and "Size: 96x64" in text
    assert last_result(live[1]).images[0].size == (96, 64)
    shoot(page, "img2img")


def paint_stroke(page, elem_id: str, dx: float) -> None:
    """Drag the brush horizontally through the centre of the editor's canvas, ±dx of its height.

    The image is fitted into the canvas and centred, so the canvas centre is the image centre.
    """
    canvas = page.locator(f"#{elem_id} canvas").first
    canvas.scroll_into_view_if_needed()   # mouse coordinates are the viewport's: the canvas must be on screen
    box = canvas.bounding_box()
    cx, cy, side = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, min(box["width"], box["height"])
    page.mouse.move(cx - dx * side, cy)
    page.mouse.down()
    page.mouse.move(cx + dx * side, cy, steps=3)
    page.mouse.up()


def upload_to_inpaint(page, path, width: int) -> None:
    open_tab(page, "Inpaint")
    # the editor drops a file given before its canvas and tools are ready
    page.locator("#inpaint_editor canvas").first.wait_for(timeout=TIMEOUT)
    page.locator("#inpaint_editor button[aria-label='Brush']").first.wait_for(timeout=TIMEOUT)
    page.locator("#inpaint_editor input[type=file]").set_input_files(str(path))
    page.wait_for_function(f"document.querySelector('#inpaint_width input[type=number]')?.value === '{width}'",
                           timeout=TIMEOUT)


def test_inpaint_changes_only_the_painted_stroke(page, live, tmp_path, shoot):
    source = picture(tmp_path / "in.png", (128, 128))   # the default brush is 24 px of the image: room for it
    upload_to_inpaint(page, tmp_path / "in.png", 128)
    page.locator("#inpaint_prompt textarea").fill("a patch")
    set_slider(page, "inpaint_steps", 3)
    set_slider(page, "inpaint_denoising_strength", 1)
    paint_stroke(page, "inpaint_editor", 0.15)   # a short horizontal stroke through the middle
    shoot(page, "inpaint-painted")
    page.locator("#inpaint_generate").click()
    wait_for_images(page, "inpaint")
    text = info_text(page, "inpaint")
    assert "Mask blur: 4" in text and "Masked content: original" in text
    result = last_result(live[1])
    out = np.asarray(Image.open(result.paths[0]).convert("RGB"), dtype=np.int16)
    src = np.asarray(source, dtype=np.int16)
    assert out.shape == src.shape
    changed = np.abs(out - src).max(axis=2) > 0
    rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
    assert changed[64, 64] and changed.sum() > 500, "the stroke area did not change"
    # only a band around the stroke changed (brush radius + blur); elsewhere the input, pixel for pixel
    assert 20 <= rows.min() and rows.max() < 108 and 4 <= cols.min() and cols.max() < 124, \
        (rows.min(), rows.max(), cols.min(), cols.max())
    assert np.array_equal(out[:20], src[:20]) and np.array_equal(out[108:], src[108:])
    assert np.array_equal(out[:, :4], src[:, :4]) and np.array_equal(out[:, 124:], src[:, 124:])
    shoot(page, "inpaint")


def test_inpaint_with_an_empty_mask_says_so(page, tmp_path):
    picture(tmp_path / "in.png")
    upload_to_inpaint(page, tmp_path / "in.png", 64)
    set_slider(page, "inpaint_steps", 2)
    page.locator("#inpaint_generate").click()
    error = page.locator("#inpaint_error .studio-error")
    error.wait_for(timeout=TIMEOUT)
    assert "mask is empty" in error.inner_text() and "Fix:" in error.inner_text()


def test_outpaint_grows_the_image(page, live, tmp_path, shoot):
    source = picture(tmp_path / "in.png")
    upload_to_inpaint(page, tmp_path / "in.png", 64)
    set_slider(page, "inpaint_steps", 2)
    page.locator("#inpaint_outpainting").click()
    set_sliders(page, {"inpaint_outpaint_right": 32, "inpaint_outpaint_up": 16})
    page.locator("#inpaint_outpaint").click()
    wait_for_images(page, "inpaint")
    assert "Size: 96x80" in info_text(page, "inpaint")
    out = np.asarray(Image.open(last_result(live[1]).paths[0]).convert("RGB"), dtype=np.int16)
    assert out.shape == (80, 96, 3)
    # the old pixels are kept where the blurred mask (8 px overlap + blur 4) is 0
    assert np.array_equal(out[34:, :44], np.asarray(source, dtype=np.int16)[18:, :44])
    shoot(page, "outpaint")
    # and the result goes back into the painter to grow it again
    page.locator("#inpaint_send_inpaint").click()
    page.wait_for_function("document.querySelector('#inpaint_width input[type=number]')?.value === '96' && "
                           "document.querySelector('#inpaint_height input[type=number]')?.value === '80'",
                           timeout=TIMEOUT)


def test_hires_fix_doubles_the_size(page, live, shoot):
    fill_prompt(page, "a hires castle")
    small(page, steps=2)
    page.locator("#txt2img_hires").click()
    page.locator("#txt2img_enable_hr input").check()
    set_slider(page, "txt2img_hires_steps", 2)
    page.wait_for_function("document.querySelector('#txt2img_hires_size')?.innerText.includes('128×128')",
                           timeout=TIMEOUT)
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery button.thumbnail-small").first.wait_for(timeout=TIMEOUT)
    text = info_text(page, "txt2img")
    assert "Hires upscale: 2" in text and "Hires upscaler: Latent" in text and "Size: 64x64" in text
    assert last_result(live[1]).images[0].size == (128, 128)
    shoot(page, "txt2img-hires")


def test_send_txt2img_result_to_img2img_and_inpaint(page, live, shoot):
    fill_prompt(page, "send me along")
    small(page, steps=2)
    set_slider(page, "txt2img_width", 72)
    page.locator("#txt2img_seed input").fill("321")
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery button.thumbnail-small").first.wait_for(timeout=TIMEOUT)
    page.locator("#txt2img_send_img2img").click()
    page.wait_for_function("document.querySelector('#img2img_prompt textarea') && "
                           "document.querySelector('#img2img_prompt textarea')?.value === 'send me along'",
                           timeout=TIMEOUT)
    page.locator("#img2img_image img").first.wait_for(timeout=TIMEOUT)
    assert page.locator("#img2img_seed input").input_value() == "321"
    assert page.locator("#img2img_width input[type=number]").input_value() == "72"
    assert page.locator("#img2img_steps input[type=number]").input_value() == "2"
    shoot(page, "img2img-sent")
    # the sent image really is the init image: generate from it
    page.locator("#img2img_generate").click()
    wait_for_images(page, "img2img")
    assert "Size: 72x64" in info_text(page, "img2img")
    # img2img's result onward to the Inpaint painter
    page.locator("#img2img_send_inpaint").click()
    page.locator("#inpaint_editor canvas").first.wait_for(timeout=TIMEOUT)
    page.wait_for_function("document.querySelector('#inpaint_prompt textarea')?.value === 'send me along'",
                           timeout=TIMEOUT)


def test_gradio_client_img2img_and_inpaint_by_name(live, tmp_path):
    from gradio_client import Client, handle_file
    picture(tmp_path / "in.png")
    mask = Image.new("L", (32, 32), 0)     # half the image's size: resized, and the page says so
    ImageDraw.Draw(mask).rectangle((10, 10, 20, 20), fill=255)
    mask.save(tmp_path / "mask.png")
    client = Client(live[0], analytics_enabled=False, download_files=str(tmp_path / "dl"), verbose=False)
    out = client.predict(init_image=handle_file(str(tmp_path / "in.png")), prompt="via client", steps=2, width=64,
                         height=64, seed=5, api_name="/img2img")
    assert "Denoising strength: 0.75" in out[4] and "Seed: 5" in out[4]
    out = client.predict(mode="Inpaint upload", upload_image=handle_file(str(tmp_path / "in.png")),
                         upload_mask=handle_file(str(tmp_path / "mask.png")), prompt="patch", steps=2, width=64,
                         height=64, api_name="/inpaint")
    assert "Mask blur: 4" in out[4] and "the mask was resized" in out[4]


def test_sketch_strokes_become_the_init_image(page, live, tmp_path, shoot):
    picture(tmp_path / "in.png")
    open_tab(page, "img2img")
    page.get_by_role("tab", name="Sketch", exact=True).click()
    page.locator("#img2img_sketch canvas").first.wait_for(timeout=TIMEOUT)
    page.locator("#img2img_sketch button[aria-label='Brush']").first.wait_for(timeout=TIMEOUT)
    page.locator("#img2img_sketch input[type=file]").set_input_files(str(tmp_path / "in.png"))
    page.wait_for_function("document.querySelector('#img2img_width input[type=number]')?.value === '64'",
                           timeout=TIMEOUT)
    set_slider(page, "img2img_steps", 2)
    set_slider(page, "img2img_denoising_strength", 0)    # strength 0: the output is (nearly) the drawing itself
    paint_stroke(page, "img2img_sketch", 0.2)
    shoot(page, "img2img-sketch")
    page.locator("#img2img_generate").click()
    wait_for_images(page, "img2img")
    job = [j for j in live[1].queue.history() if j.result is not None][-1]
    init = np.asarray(job.result.request.init_images[0].convert("RGB"), dtype=np.int16)
    source = np.asarray(Image.open(tmp_path / "in.png").convert("RGB"), dtype=np.int16)
    changed = np.abs(init - source).max(axis=2) > 0
    assert changed[32, 32] and not changed[:16].any(), "the stroke is not in the init image"


def test_batch_folder_in_folder_out(page, live, tmp_path, shoot):
    # typed folders must lie inside the studio's folders (studio.paths)
    src, out = Path(live[1].settings.data_dir) / f"{tmp_path.name}-in", Path(live[1].settings.outdir) / tmp_path.name
    src.mkdir()
    picture(src / "one.png")
    picture(src / "two.png")
    (src / "readme.txt").write_text("not an image")
    open_tab(page, "img2img")
    page.get_by_role("tab", name="Batch", exact=True).click()
    page.locator("#img2img_batch_input_dir textarea").fill(str(src))
    page.locator("#img2img_batch_output_dir textarea").fill(str(out))
    set_slider(page, "img2img_width", 64)
    set_slider(page, "img2img_height", 64)
    set_slider(page, "img2img_steps", 2)
    page.locator("#img2img_generate").click()
    wait_for_images(page, "img2img", 2)
    summary = page.locator("#img2img_info").inner_text()
    assert "2 file(s) processed" in summary and "readme.txt" in summary
    assert sorted(p.name for p in out.iterdir()) == ["one.png", "two.png"]
    shoot(page, "img2img-batch")


def test_png_info_sends_image_and_parameters_to_inpaint(page, live, tmp_path):
    from studio.request import GenerationRequest
    result = live[1].generate(GenerationRequest(prompt="from png info", steps=2, width=64, height=72, seed=99,
                                                mode="txt2img"), timeout=120)
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(result.paths[0])
    page.wait_for_function("document.querySelector('#pnginfo_parameters textarea')?.value.length > 0",
                           timeout=TIMEOUT)
    page.locator("#pnginfo_send_inpaint").click()
    page.wait_for_function("document.querySelector('#inpaint_prompt textarea') && "
                           "document.querySelector('#inpaint_prompt textarea')?.value === 'from png info'",
                           timeout=TIMEOUT)
    assert page.locator("#inpaint_seed input").input_value() == "99"
    assert page.locator("#inpaint_height input[type=number]").input_value() == "72"
    page.locator("#inpaint_editor canvas").first.wait_for(timeout=TIMEOUT)


def test_png_info_sends_hires_fix_to_txt2img(page):
    text = ("a big castle\nSteps: 12, Sampler: Euler, CFG scale: 6, Seed: 5, Size: 64x64, Denoising strength: 0.45, "
            "Hires upscale: 1.5, Hires steps: 5, Hires upscaler: Lanczos, Version: v1.10.1")
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_parameters textarea").fill(text)
    page.locator("#pnginfo_send_txt2img").click()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value === 'a big castle'",
                           timeout=TIMEOUT)
    page.locator("#txt2img_hires").click()
    assert page.locator("#txt2img_enable_hr input").is_checked()
    assert page.locator("#txt2img_hr_scale input[type=number]").input_value() == "1.5"
    assert page.locator("#txt2img_hires_steps input[type=number]").input_value() == "5"
    assert page.locator("#txt2img_hr_denoising input[type=number]").input_value() == "0.45"
    assert page.locator("#txt2img_hr_upscaler input[role=combobox]").input_value() == "Lanczos"
