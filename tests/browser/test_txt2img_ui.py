"""txt2img in a real browser: generate, live progress + interrupt, errors, two pages sharing the one queue."""
from __future__ import annotations

import re
import time

from tests.browser.conftest import open_app

TIMEOUT = 120_000  # generous: a busy machine is slow, and a wait ends as soon as its condition holds


def set_slider(page, elem_id: str, value) -> None:
    """Type a slider's value and wait until the slider itself shows it.

    A fill that lands while Gradio is still mounting the slider (a just-opened accordion) is dropped on a busy
    machine; the range input only moves once the component's state holds the value, so wait for that and type
    again if it never comes.
    """
    box = page.locator(f"#{elem_id} input[type=number]")
    for attempt in range(3):
        box.fill(str(value))
        box.press("Enter")
        try:
            page.wait_for_function(
                "([id, v]) => Number(document.querySelector(`#${id} input[type=range]`)?.value) === Number(v)",
                arg=[elem_id, str(value)], timeout=TIMEOUT // 6)
            return
        except Exception:
            if attempt == 2:
                raise


def set_sliders(page, values: dict) -> None:
    """Set several sliders, then check they all still hold their values before going on: on a busy machine a
    slider of a just-opened accordion can finish mounting after the check in ``set_slider`` and fall back to its
    initial value."""
    for elem_id, value in values.items():
        set_slider(page, elem_id, value)
    read = "([id, v]) => Number(document.querySelector(`#${id} input[type=range]`)?.value) === Number(v)"
    for _ in range(3):
        page.wait_for_timeout(300)
        lost = {k: v for k, v in values.items() if not page.evaluate(read, [k, str(v)])}
        if not lost:
            return
        for elem_id, value in lost.items():
            set_slider(page, elem_id, value)
    raise AssertionError(f"sliders did not keep their values: {lost}")


def fill_prompt(page, text: str) -> None:
    page.locator("#txt2img_prompt textarea").fill(text)


def small(page, steps: int = 3) -> None:
    set_slider(page, "txt2img_width", 64)
    set_slider(page, "txt2img_height", 64)
    set_slider(page, "txt2img_steps", steps)


def wait_for_images(page, count: int = 1) -> None:
    page.locator("#txt2img_gallery button.thumbnail-small").nth(count - 1).wait_for(timeout=TIMEOUT)


def info_text(page) -> str:
    page.locator("#txt2img_info .infotext").wait_for(timeout=TIMEOUT)
    return page.locator("#txt2img_info .infotext").inner_text()


def test_generate_shows_image_and_infotext(page, shoot):
    fill_prompt(page, "a red lighthouse on a cliff")
    page.locator("#txt2img_neg_prompt textarea").fill("blurry")
    small(page)
    page.locator("#txt2img_seed input").fill("1234")
    set_slider(page, "txt2img_batch_size", 2)
    # the token counter counts CLIP tokens of the prompt
    page.wait_for_function("document.querySelector('#txt2img_token_counter')?.innerText.startsWith('6/75')",
                           timeout=TIMEOUT)
    page.locator("#txt2img_generate").click()
    wait_for_images(page, 2)
    text = info_text(page)
    assert text.startswith("a red lighthouse on a cliff")
    assert "Negative prompt: blurry" in text
    assert "Steps: 3" in text and "Seed: 1234" in text and "Size: 64x64" in text
    assert "Model: demo-untrained" in text
    # a test fixture is not the demo model: no note about what the demo knows
    assert not page.locator("#demo_model_note").is_visible()
    # selecting the second image shows its own infotext; ♻️ takes its seed
    page.locator("#txt2img_gallery button.thumbnail-small").nth(1).click()
    page.wait_for_function("document.querySelector('#txt2img_info')?.innerText.includes('Seed: 1235')",
                           timeout=TIMEOUT)
    page.keyboard.press("Escape")
    page.locator("#txt2img_reuse_seed").click()
    page.wait_for_function("document.querySelector('#txt2img_seed input')?.value === '1235'", timeout=TIMEOUT)
    page.locator("#txt2img_random_seed").click()
    page.wait_for_function("document.querySelector('#txt2img_seed input')?.value === '-1'", timeout=TIMEOUT)
    shoot(page, "txt2img")


def test_width_height_swap(page):
    set_slider(page, "txt2img_width", 128)
    set_slider(page, "txt2img_height", 64)
    page.locator("#txt2img_swap").click()
    page.wait_for_function("document.querySelector('#txt2img_width input[type=number]')?.value === '64' && "
                           "document.querySelector('#txt2img_height input[type=number]')?.value === '128'",
                           timeout=TIMEOUT)


def test_interrupt_ends_a_long_job_early(page, live, shoot):
    fill_prompt(page, "a very long job")
    small(page, steps=2000)
    page.locator("#txt2img_generate").click()
    page.wait_for_function("/step [1-9]/.test(document.querySelector('#txt2img_progress')?.innerText)",
                           timeout=TIMEOUT)
    assert page.locator("#txt2img_preview").is_visible()
    shoot(page, "txt2img-progress")
    page.locator("#txt2img_interrupt").click()
    wait_for_images(page)
    text = page.locator("#txt2img_info").inner_text()
    m = re.search(r"Interrupted at step (\d+)/2000", text)
    assert m and int(m.group(1)) < 2000, text
    assert live[1].queue.current() is None


def test_bad_input_gives_a_clear_message(page, live):
    # a checkpoint that is not there: the switch fails with a message, the loaded model stays loaded
    box = page.locator("#setting_sd_model_checkpoint input[role=combobox]")
    box.fill("no-such-model.safetensors")
    box.press("Enter")
    status = page.locator("#quicksettings_status .studio-error")
    status.wait_for(timeout=TIMEOUT)
    assert "no-such-model.safetensors" in status.inner_text() and "Fix:" in status.inner_text()
    assert live[1].manager.current is not None
    # a bad field: the message names it, and no traceback reaches the page
    fill_prompt(page, "x")
    small(page, steps=1)
    page.locator("#txt2img_seed input").fill("-5")
    page.locator("#txt2img_generate").click()
    error = page.locator("#txt2img_error .studio-error")
    error.wait_for(timeout=TIMEOUT)
    assert "'seed' is -5" in error.inner_text()
    assert "Traceback" not in page.content()


def test_two_pages_both_get_results_in_order(browser, live, shoot):
    studio = live[1]
    pages = [open_app(browser, live[0]) for _ in range(2)]
    try:
        for i, p in enumerate(pages):
            fill_prompt(p, f"page {i} prompt")
            small(p, steps=40)
        before = {j.id for j in studio.queue.history()}

        def submitted(description: str) -> bool:
            jobs = [studio.queue.current(), *studio.queue.pending(), *studio.queue.history()]
            return any(j is not None and j.id not in before and j.description == description for j in jobs)
        for i, p in enumerate(pages):
            p.locator("#txt2img_generate").click()
            # two pages' clicks race on a busy machine: page 1 clicks once page 0's job is in the queue
            deadline = time.monotonic() + TIMEOUT / 1000
            while not submitted(f"page {i} prompt"):
                assert time.monotonic() < deadline, f"page {i}'s job never reached the queue"
                time.sleep(0.1)
        for i, p in enumerate(pages):
            wait_for_images(p)
            assert info_text(p).startswith(f"page {i} prompt")
        jobs = sorted((j for j in studio.queue.history() if j.id not in before), key=lambda j: j.seq)
        assert [j.description for j in jobs] == ["page 0 prompt", "page 1 prompt"]
        assert jobs[0].finished <= jobs[1].started  # one device: the second ran after the first
    finally:
        for p in pages:
            p.context.close()


def test_skip_ends_the_current_image_only(page):
    fill_prompt(page, "skip me")
    small(page, steps=2000)
    set_slider(page, "txt2img_batch_count", 2)
    page.locator("#txt2img_generate").click()
    progress = "document.querySelector('#txt2img_progress')?.innerText"
    page.wait_for_function(f"/image 1\\/2 · step [1-9]/.test({progress})", timeout=TIMEOUT)
    page.locator("#txt2img_skip").click()
    page.wait_for_function(f"/image 2\\/2 · step [1-9]/.test({progress})", timeout=TIMEOUT)
    page.locator("#txt2img_interrupt").click()
    wait_for_images(page, 2)  # the skipped image and the interrupted one, both early
    assert "Interrupted at step" in page.locator("#txt2img_info").inner_text()


def test_interrupt_acts_on_this_pages_own_job(browser, live):
    first, second = (open_app(browser, live[0]) for _ in range(2))
    try:
        for p, prompt in ((first, "runs on"), (second, "waits then is cancelled")):
            fill_prompt(p, prompt)
            small(p, steps=2000 if p is first else 2)
        set_slider(first, "txt2img_batch_count", 50)  # 100k steps: still running however slow the clicks below
        first.locator("#txt2img_generate").click()
        first.wait_for_function("/step [1-9]/.test(document.querySelector('#txt2img_progress')?.innerText)",
                                timeout=TIMEOUT)
        second.locator("#txt2img_generate").click()
        second.wait_for_function("document.querySelector('#txt2img_progress')?.innerText.includes('queue')",
                                 timeout=TIMEOUT)
        second.locator("#txt2img_interrupt").click()  # cancels the second page's queued job only
        second.locator("#txt2img_info .studio-note").wait_for(timeout=TIMEOUT)
        assert "Interrupted before" in second.locator("#txt2img_info").inner_text()
        running = live[1].queue.current()
        assert running is not None and running.description == "runs on"
        first.locator("#txt2img_interrupt").click()
        wait_for_images(first)
    finally:
        first.context.close()
        second.context.close()
