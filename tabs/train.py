"""Train: LoRA / LoCon / LoHa / LoKr / DreamBooth-LoRA / Textual Inversion / ControlNet from dropped images
(kohya_ss-like).

Sections: Dataset (``webui.train_dataset``), Method and Training (``webui.train_form``), Run
(``webui.train_run``). The form maps one widget per ``TrainConfig`` field; Start hands the values to
``studio.training`` (the service the REST API shares: one training at a time, later runs queue). When a run
is done, "Try it" fills txt2img with the new LoRA's tag, the trigger word and a sample prompt (a new ControlNet:
its unit 0).
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from webui import train_dataset, train_form, train_run
from webui.common import note_html
from webui.sendto import fields_from_text


def build(studio: Any) -> dict:
    f: dict[str, Any] = {}          # TrainConfig field name -> widget (filled by every section)
    with gr.Accordion("1 · Dataset", open=True, elem_id="train_dataset_section"):
        d = train_dataset.build(studio, f)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Accordion("2 · Method", open=True, elem_id="train_method_section"):
                train_form.method_section(f, studio)
            with gr.Accordion("3 · Training", open=True, elem_id="train_training_section"):
                train_form.training_section(studio, f)
        with gr.Column(scale=2):
            gr.Markdown("### 4 · Run")
            r = train_run.build(studio)
    train_run.wire(studio, f, r)
    train_dataset.wire_example(studio, f, d)
    return {"fields": f, "dataset": d, "run": r}


def connect(studio: Any, ui: dict) -> None:
    """Try it: txt2img gets the LoRA tag + trigger word + first sample prompt (and its options), as an infotext
    through the same parser "Send to" uses, then the txt2img tab opens."""
    me, target = ui["train"], ui.get("txt2img")
    run = me["run"]
    if target is None:
        run["try"].visible = False
        return
    names = list(target["fields"])
    # the ControlNet units of txt2img, filled from the infotext's "ControlNet 0" (a trained ControlNet)
    cn = target.get("controlnet")
    units = (cn.restore_outputs, lambda text: cn.restore(text, reset=False)) if cn is not None else ([], None)
    outputs = [*[target["fields"][n] for n in names], *units[0], ui["quick"]["checkpoint"], ui["tabs"],
               run["result"]]
    keep = [gr.update() for _ in outputs]

    def try_it(state: dict, trigger: str) -> list:
        tried = (state or {}).get("try")
        if not tried:
            return keep[:-1] + [note_html("Nothing to try yet: finish a training first.")]
        title = train_form.checkpoint_title_for(studio, tried["base"])
        base = title.rsplit(" [", 1)[0] if title != tried["base"] else None    # listed: switch to it
        text = train_run.try_it_text(tried, trigger or "", base)
        values, checkpoint, notes = fields_from_text(studio, text, names, fill_defaults=False)
        unit_updates = []
        if units[1] is not None:
            unit_updates, more = units[1](text)
            notes = [*notes, *more]
            if tried.get("controlnet"):
                cond = tried["controlnet"]
                what = "a condition image" if cond == "folder" else f"a picture (its {cond} map is made from it)"
                notes.append(f"{tried['name']} is in ControlNet unit 0: drop {what} into it.")
        return ([values[n] if n in values else gr.update() for n in names] + list(unit_updates)
                + [checkpoint or gr.update(), gr.Tabs(selected="txt2img"),
                   note_html(" ".join(notes)) if notes else gr.update()])

    run["try"].click(try_it, [run["state"], me["dataset"]["trigger"]], outputs, queue=False,
                     api_visibility="private")
