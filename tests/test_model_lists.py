"""Every model list of the page follows the folders: one change (a file dropped in, a LoRA trained) reaches every
dropdown through the gradio handlers of a tab select and of any 🔄, without a restart."""
from __future__ import annotations

import shutil
import time

import gradio as gr
import pytest

from tests.uihelpers import by_id, handlers


@pytest.fixture()
def page(studio):
    from webui.layout import build_blocks
    return build_blocks(studio)


def handler(blocks, block, event):
    """The one model-list handler fired by ``event`` on ``block`` (its fn, inputs and outputs)."""
    from webui.model_lists import ModelLists
    fns = handlers(blocks, block, event)
    lists = ModelLists.collect(None, blocks).components
    hits = [f for f in fns if list(f.outputs[:len(lists)]) == lists]
    assert len(hits) == 1, f"{len(hits)} model-list handlers on {block.elem_id}.{event}"
    return hits[0]


def fire(blocks, block, event):
    """Run the handler as gradio would (values as the components hold them), return {component: update}."""
    fn = handler(blocks, block, event)
    values = [c.value for c in fn.inputs]
    out = fn.fn(*values)
    return dict(zip(fn.outputs, out))


def choices_of(update):
    return [c[0] if isinstance(c, tuple) else c for c in update.get("choices", [])] if isinstance(update, dict) \
        else None


def write_lora(path, studio):
    from tests import lorafiles, tinymodels
    tensors, _ = lorafiles.kohya_lora(tinymodels.make_tiny("sd1", seed=0), seed=3, rank=2, conv=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    lorafiles.write(path, tensors)


def test_a_file_dropped_in_reaches_every_list_on_tab_select(page, studio, models_dir):
    merge_lora_tab = by_id(page, "merge_tab_lora")
    write_lora(models_dir / "Lora" / "fresh_lora.safetensors", studio)
    shutil.copy(models_dir / "Stable-diffusion" / "tiny-sd1.safetensors",
                models_dir / "Stable-diffusion" / "dropped.safetensors")
    updates = fire(page, merge_lora_tab, "select")
    for elem_id in ("merge_bake_add", "merge_loras_add", "merge_resize_lora"):
        assert "fresh_lora" in choices_of(updates[by_id(page, elem_id)]), elem_id
    for elem_id in ("setting_sd_model_checkpoint", "merge_bake_checkpoint", "merge_extract_tuned", "merge_model_a",
                    "train_base_model"):
        assert "dropped.safetensors" in choices_of(updates[by_id(page, elem_id)]), elem_id
    # the page now shows these choices: the next select sends nothing for lists that did not change
    state = next(c for c in updates if isinstance(c, gr.State))
    again = handler(page, merge_lora_tab, "select")
    values = [c.value for c in again.inputs[:-1]] + [updates[state]]
    second = dict(zip(again.outputs, again.fn(*values)))
    assert choices_of(second[by_id(page, "merge_bake_add")]) == []


def test_one_unit_refresh_refreshes_every_unit_of_every_tab(page, studio, models_dir):
    from tests import controlnets, tinymodels
    units = [by_id(page, f"{tab}_cn_{i}_model") for tab in ("txt2img", "img2img", "controlnet")
             for i in range(studio.settings.controlnet_units)]
    assert all(choices_of({"choices": u.choices}) == ["None"] for u in units)   # no ControlNet at start
    (models_dir / "ControlNet").mkdir(exist_ok=True)
    controlnets.write_ldm(controlnets.make_controlnet(tinymodels.make_tiny("sd1", seed=0).unet, seed=1),
                          models_dir / "ControlNet" / "control_fresh.safetensors")
    updates = fire(page, by_id(page, "txt2img_cn_0_refresh"), "click")
    for unit in units:
        listed = choices_of(updates[unit])
        assert len(listed) == 2 and listed[1].startswith("control_fresh"), unit.elem_id


def test_page_load_sees_new_files_and_sets_the_current_checkpoint(page, studio, models_dir):
    write_lora(models_dir / "Lora" / "sub" / "late_lora.safetensors", studio)
    updates = fire(page, page, "load")
    assert "late_lora" in choices_of(updates[by_id(page, "merge_resize_lora")])
    quick = updates[by_id(page, "setting_sd_model_checkpoint")]
    assert quick["value"] and quick["value"].startswith("tiny-sd1.safetensors")


def test_a_removed_model_resets_a_list_that_takes_no_custom_value(page, studio, models_dir):
    write_lora(models_dir / "Lora" / "gone.safetensors", studio)
    studio.loras.refresh()
    fn = handler(page, by_id(page, "merge_refresh"), "click")
    values = [c.value for c in fn.inputs]
    resize = by_id(page, "merge_resize_lora")
    values[fn.inputs.index(resize)] = "gone"
    (models_dir / "Lora" / "gone.safetensors").unlink()
    updates = dict(zip(fn.outputs, fn.fn(*values)))
    assert "gone" not in choices_of(updates[resize]) and updates[resize]["value"] is None


def test_libraries_see_folder_changes_by_stat_only(studio, models_dir):
    assert studio.loras.refresh_if_changed() is False
    assert studio.registry.refresh_if_changed() is False
    assert studio.controlnets.refresh_if_changed() is False
    write_lora(models_dir / "Lora" / "x.safetensors", studio)
    assert studio.loras.refresh_if_changed() is True
    assert studio.loras.find("x") is not None
    assert studio.loras.refresh_if_changed() is False
    # a preview written next to a LoRA (a finished training) is a change too: the card shows it
    time.sleep(0.01)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(models_dir / "Lora" / "x.preview.png")
    assert studio.loras.refresh_if_changed() is True
    assert studio.loras.find("x").preview is not None
    target = models_dir / "Stable-diffusion" / "tiny-sd1-b.safetensors"
    target.unlink()
    assert studio.registry.refresh_if_changed() is True
    assert "tiny-sd1-b.safetensors" not in [i.name for i in studio.registry.checkpoints()]
