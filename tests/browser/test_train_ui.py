"""The Train tab in a real browser: drop images, import, caption, train ~10 steps, watch loss and samples, try it."""
from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from studio.training.config import TrainConfig
from tests.training.conftest import make_shape

TIMEOUT = 120_000  # generous: a busy machine is slow, and a wait ends as soon as its condition holds
RUN_TIMEOUT = 300_000
SHAPES = (("circle", (220, 40, 40)), ("square", (40, 200, 60)), ("triangle", (40, 80, 230)),
          ("cross", (230, 200, 40)))


def dropped_files(folder) -> list:
    """Four coloured shapes with captions, plus a non-image and a too-small image (both reported, left out)."""
    folder.mkdir()
    paths = []
    for i, (kind, colour) in enumerate(SHAPES):
        make_shape(kind, colour, (64, 64)).save(folder / f"shape{i}.png")
        (folder / f"shape{i}.txt").write_text(f"a {kind}, plain background\n")
        paths += [folder / f"shape{i}.png", folder / f"shape{i}.txt"]
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(folder / "tiny.png")
    return [str(p) for p in paths + [folder / "notes.pdf", folder / "tiny.png"]]


def fill(page, elem_id: str, value, kind: str = "input") -> None:
    """Type a value and leave the box; again if a re-render (an accordion just opened) dropped it."""
    box = page.locator(f"#{elem_id} {'textarea' if kind == 'text' else 'input'}").first
    for _ in range(5):
        box.fill(str(value))
        box.press("Tab")
        page.wait_for_timeout(1000)  # long enough for a pending re-render to land on a busy machine
        if box.input_value() == str(value):
            return
    raise AssertionError(f"#{elem_id} did not keep {value!r}")


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def wait_text(page, elem_id: str, needle: str, timeout: int = TIMEOUT) -> None:
    page.wait_for_function(f"(document.querySelector('#{elem_id}')?.innerText || '').includes({needle!r})",
                           timeout=timeout)


def at_64px(page) -> None:
    """Open the bucket options and train at 64 px (the tiny models' size)."""
    page.locator("#train_buckets").get_by_text("Buckets and caption options").click()
    page.locator("#train_resolution input").wait_for(state="visible", timeout=TIMEOUT)
    page.wait_for_timeout(500)                      # the opened accordion renders its fields once more
    fill(page, "train_resolution", 64)
    fill(page, "train_min_bucket_reso", 64)


def test_train_tab_end_to_end(page, live, shoot, tmp_path):
    studio = live[1]
    page.get_by_role("tab", name="Train").click()
    page.locator("#train_import").wait_for(timeout=TIMEOUT)
    shoot(page, "train-idle")

    # dataset: dropped files are imported at once (no Import press) into the dataset named first; the
    # non-image is refused and the tiny image skipped, with reasons
    fill(page, "train_dataset_name", "ui_shapes_ds", "text")
    page.locator("#train_files input[type=file]").set_input_files(dropped_files(tmp_path / "drop"))
    wait_text(page, "train_import_report", "notes.pdf")
    report = text_of(page, "train_import_report")
    assert "not an image" in report and "tiny.png" in report and "too small" in report
    assert "4 image(s)" in report
    page.wait_for_function("document.querySelectorAll('#train_thumbs img').length >= 4", timeout=TIMEOUT)
    assert "a circle, plain background" in text_of(page, "train_captions")
    folder = page.locator("#train_dataset_dir textarea").input_value()
    assert folder.endswith("ui_shapes_ds")

    # bulk: a trigger word goes first in every caption (written to the .txt files); tag frequency follows
    fill(page, "train_trigger", "shp", "text")
    page.locator("#train_bulk_apply").click()
    wait_text(page, "train_import_report", "Updated 4 caption(s)")
    wait_text(page, "train_captions", "shp, a circle, plain background")
    assert "shp" in text_of(page, "train_tags")
    # no BLIP model on this machine: the message names the folder it expects
    page.locator("#train_blip").click()
    wait_text(page, "train_import_report", "No BLIP captioner in")
    assert "captioners/blip-image-captioning-base" in text_of(page, "train_import_report")
    at_64px(page)
    fill(page, "train_max_bucket_reso", 128)
    page.locator("#train_bucket_report_button").click()
    wait_text(page, "train_bucket_report", "64x64")

    # a tiny run: 10 steps, samples at 0, 5 and 10
    fill(page, "train_rank", 2)
    fill(page, "train_learning_rate", 0.001)
    fill(page, "train_max_steps", 10)
    fill(page, "train_batch_size", 2)
    fill(page, "train_sample_prompts", "shp, a red circle --w 64 --h 64 --s 2 --d 3 --l 5", "text")
    fill(page, "train_sample_every", 5)
    fill(page, "train_output_name", "ui_shapes", "text")
    page.locator("#train_config_box").get_by_text("Config file (TOML)").click()
    page.locator("#train_save_config").click()
    wait_text(page, "train_config_note", "python launch.py --train")
    toml = page.locator("#train_config_path textarea").input_value()
    cfg = TrainConfig.load(toml)
    assert (cfg.max_steps, cfg.rank, cfg.sample_every, cfg.resolution, cfg.output_name) == (10, 2, 5, 64, "ui_shapes")
    assert cfg.dataset_dir == folder and cfg.base_model.endswith("demo-untrained.safetensors")

    page.locator("#train_start").click()
    wait_text(page, "train_progress", "step", RUN_TIMEOUT)
    page.locator("#train_loss canvas, #train_loss svg").first.wait_for(timeout=RUN_TIMEOUT)
    page.wait_for_function("document.querySelectorAll('#train_samples img').length >= 1", timeout=RUN_TIMEOUT)
    wait_text(page, "train_result", "ui_shapes.safetensors", RUN_TIMEOUT)
    assert "step 10/10" in text_of(page, "train_progress")
    page.wait_for_function("document.querySelectorAll('#train_samples img').length >= 3", timeout=TIMEOUT)
    assert "step 5" in text_of(page, "train_samples")
    shoot(page, "train-done")

    # the LoRA is listed at once, and Try it fills txt2img with its tag, the trigger word and the sample prompt
    lora = studio.loras.find("ui_shapes")
    assert lora is not None and lora.metadata.get("modelspec.title") == "ui_shapes"
    assert lora.metadata.get("ss_steps") == "10" and "shp" in lora.trigger_words
    page.locator("#train_try").click()
    page.locator("#txt2img_prompt textarea").wait_for(state="visible", timeout=TIMEOUT)
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value.startsWith('<lora:ui_shapes:')",
                           timeout=TIMEOUT)
    assert page.locator("#txt2img_prompt textarea").input_value() == "<lora:ui_shapes:1>, shp, a red circle"
    assert page.locator("#txt2img_seed input").input_value() == "3"
    assert page.locator("#txt2img_width input[type=number]").input_value() == "64"
    panel = page.locator("#txt2img_extra_networks")
    if panel.count():                                 # the extra-networks panel lists the new LoRA at once
        panel.get_by_text("Extra networks").first.click()
        wait_text(page, "txt2img_extra_lora_cards", "ui_shapes")
    shoot(page, "train-try-it")


def test_bad_field_method_groups_and_load_config(page, live, tmp_path):
    page.get_by_role("tab", name="Train").click()
    page.locator("#train_start").wait_for(timeout=TIMEOUT)
    fill(page, "train_dataset_dir", "/no/such/dataset", "text")
    page.locator("#train_start").click()
    wait_text(page, "train_error", "dataset.dataset_dir")
    assert "Dataset folder" in text_of(page, "train_error")

    # each method shows its own fields
    page.locator("#train_method").get_by_text("Textual Inversion").click()
    page.locator("#train_token").wait_for(state="visible", timeout=TIMEOUT)
    assert page.locator("#train_rank").is_hidden() and page.locator("#train_class_prompt").is_hidden()
    page.locator("#train_method").get_by_text("DreamBooth-LoRA").click()
    page.locator("#train_class_prompt").wait_for(state="visible", timeout=TIMEOUT)
    assert page.locator("#train_rank").is_visible() and page.locator("#train_token").is_hidden()

    # Load config fills the form from a TOML file (what the CLI runs)
    # (a typed config path must lie inside the studio's folders: data/ is one)
    toml = TrainConfig(method="loha", rank=6, conv_rank=3, max_steps=77, output_name="from_toml",
                       sample_prompts="a b --w 64\nc d",
                       dataset_dir="/data/x").save(Path(live[1].settings.data_dir) / tmp_path.name / "run.toml")
    page.locator("#train_config_box").get_by_text("Config file (TOML)").click()
    fill(page, "train_config_path", str(toml), "text")
    page.locator("#train_load_config").click()
    wait_text(page, "train_config_note", "Loaded run.toml")
    assert page.locator("#train_output_name textarea").input_value() == "from_toml"
    assert page.locator("#train_max_steps input").input_value() == "77"
    assert page.locator("#train_rank input[type=number]").input_value() == "6"
    assert page.locator("#train_sample_prompts textarea").input_value() == "a b --w 64\nc d"
    assert page.locator("#train_method input[value=loha]").is_checked()


def test_controlnet_training_from_the_tab(page, live, shoot, tmp_path):
    """Method ControlNet with canny maps: trained in the tab, listed in models/ControlNet, Try it puts it in
    txt2img's ControlNet unit 0."""
    studio = live[1]
    page.get_by_role("tab", name="Train").click()
    page.locator("#train_import").wait_for(timeout=TIMEOUT)
    fill(page, "train_dataset_name", "ui_canny_ds", "text")
    page.locator("#train_files input[type=file]").set_input_files(dropped_files(tmp_path / "drop"))
    wait_text(page, "train_import_report", "4 image(s)")
    page.locator("#train_method").get_by_text("ControlNet", exact=True).click()
    page.locator("#train_conditioning").wait_for(state="visible", timeout=TIMEOUT)
    assert page.locator("#train_rank").is_hidden() and page.locator("#train_token").is_hidden()
    assert "conditioning/" in text_of(page, "train_method_help")
    at_64px(page)
    fill(page, "train_learning_rate", 0.001)
    fill(page, "train_max_steps", 4)
    fill(page, "train_batch_size", 2)
    fill(page, "train_sample_prompts", "a red circle --w 64 --h 64 --s 2 --d 3", "text")
    fill(page, "train_sample_every", 4)
    fill(page, "train_output_name", "ui_canny", "text")
    page.locator("#train_start").click()
    wait_text(page, "train_result", "ui_canny.safetensors", RUN_TIMEOUT)
    assert "ControlNet" in text_of(page, "train_result")
    page.wait_for_function("document.querySelectorAll('#train_samples img').length >= 1", timeout=TIMEOUT)
    shoot(page, "train-controlnet-done")
    info = studio.controlnets.find("ui_canny")
    assert info is not None and info.path.parent == studio.settings.controlnet_path
    runs = Path(studio.settings.data_dir) / "training" / "ui_canny"
    assert len(list((runs / "conditions").glob("*.png"))) == 4      # the canny maps, made once
    sample = Image.open(sorted((runs / "samples").glob("*.png"))[-1])
    assert sample.size == (128, 64)                                  # condition | sample

    page.locator("#train_try").click()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea')?.value === 'a red circle'",
                           timeout=TIMEOUT)
    unit = page.locator("#txt2img_cn_0_model input").first
    page.wait_for_function("(document.querySelector('#txt2img_cn_0_model input')?.value || '')"
                           ".startsWith('ui_canny')", timeout=TIMEOUT)
    assert unit.input_value().startswith("ui_canny")
    assert "drop a picture" in text_of(page, "train_result")
    shoot(page, "train-controlnet-try-it")


def test_send_to_dataset_then_refine(page, live, shoot, tmp_path):
    """The loop in the browser: a txt2img picture goes to a new dataset (typed in the gallery's dataset box) with
    its prompt as caption; the Train tab shows the dataset's versions; Refine sets a finished run up again."""
    from tests.browser.test_txt2img_ui import fill_prompt, small, wait_for_images
    studio = live[1]
    base = next(i.title for i in studio.registry.checkpoints() if "untrained" in i.name)
    seed = tmp_path / "seed"
    dropped_files(seed)
    svc = studio.training
    svc.start({"base_model": base, "dataset_dir": str(seed), "output_name": "ui_loop", "resolution": 64,
               "min_bucket_reso": 64, "min_image_side": 32, "rank": 2, "max_steps": 2, "batch_size": 2,
               "sample_at_start": False})
    fill_prompt(page, "a red lighthouse <lora:other:1>")
    small(page, 2)
    page.locator("#txt2img_generate").click()
    wait_for_images(page, 1)
    box = page.locator("#txt2img_dataset input")
    box.fill("ui_picked")
    box.press("Enter")
    page.locator("#txt2img_send_dataset").click()
    wait_text(page, "txt2img_note", "Added")
    assert "caption: a red lighthouse" in text_of(page, "txt2img_note")
    folder = svc.datasets_dir() / "ui_picked"
    [picture] = folder.glob("*.png")
    assert picture.with_suffix(".txt").read_text().strip() == "a red lighthouse"
    page.locator("#txt2img_send_dataset").click()                       # twice: kept once
    wait_text(page, "txt2img_note", "Already in the dataset")
    assert len(list(folder.glob("*.png"))) == 1

    assert svc.wait(RUN_TIMEOUT / 1000), svc.status()
    page.get_by_role("tab", name="Train").click()
    fill(page, "train_dataset_dir", str(folder), "text")
    page.locator("#train_dataset_dir textarea").press("Enter")
    page.locator("#train_versions_box").get_by_text("Versions of this dataset").click()
    wait_text(page, "train_versions", "+1 image(s)")
    runs = page.locator("#train_refine_run input")
    runs.click()
    page.get_by_role("option", name="ui_loop · ui_loop.safetensors").click()
    page.locator("#train_refine").click()
    wait_text(page, "train_refine_note", "starts from ui_loop.safetensors")
    page.wait_for_function("document.querySelector('#train_output_name textarea')?.value === 'ui_loop_r2'",
                           timeout=TIMEOUT)
    assert page.locator("#train_network_weights textarea").input_value().endswith("Lora/ui_loop.safetensors")
    assert page.locator("#train_dataset_dir textarea").input_value() == str(folder)     # the one open
    assert not picture.name.startswith(("tmp", "0" * 8)) and re.match(r"\d{5}-\d+\.png$", picture.name), picture
    shoot(page, "train-refine")
