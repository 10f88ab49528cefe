"""ControlNet: txt2img guided by ControlNet units, with big control images and the detected maps shown beside
the results. The same units sit in an accordion on txt2img, img2img and Inpaint (``webui.controlnet_ui``).

"Send to ControlNet" (any gallery, PNG Info) puts the image into unit 0 and restores the units the infotext
names (``ControlNet 0: "Module: canny, Model: ..."``).
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.request import GenerationRequest
from webui import generation as gen
from webui.common import TokenCounter
from webui.controlnet_ui import controlnet_units_ui
from webui.sendto import image_size

FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "distilled_cfg_scale",
          "width", "height", "n_iter", "batch_size", "seed", "subseed", "subseed_strength", "clip_skip")
_SENT = tuple(n for n in FIELDS if n not in ("width", "height"))


def build(studio: Any) -> dict:
    me = gen.prompt_row("controlnet", TokenCounter(studio))
    f = me["fields"]
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            me["controlnet"] = cn = controlnet_units_ui(studio, "controlnet", big=True, wire_preview=False)
            with gr.Accordion("Generation", open=True, elem_id="controlnet_generation"):
                seed_buttons = gen.sampling_options("controlnet", studio, f)
        with gr.Column(scale=1):
            me.update(gen.output_panel("controlnet", studio, "txt2img"))
    cn.wire_preview(size=(f["width"], f["height"]))
    gen.wire_controls(studio, me, seed_buttons)
    own = me["send"].pop("controlnet", None)   # sending a result to its own tab makes no sense
    if own is not None:
        own.visible = False
    me["send_inputs"] = [me["results"]]
    me["send_pick"] = gen.selected
    unit0 = cn.units[0]
    me["receive"] = {"outputs": [unit0["image"], f["width"], f["height"], *[f[n] for n in _SENT]],
                     "names": list(_SENT), "fill": lambda path, values: _receive(studio, path, values),
                     "from_text": (cn.restore_outputs, lambda text: _units_from_text(cn, text))}
    return me


def _receive(studio: Any, path: str, values: dict) -> list:
    size = image_size(path, studio)
    return [path, size[0] if size else gr.update(), size[1] if size else gr.update(),
            *[values.get(n, gr.update()) for n in _SENT]]


def _units_from_text(cn: Any, text: str) -> tuple[list, list[str]]:
    updates, notes = cn.restore(text, reset=False)
    updates[0] = True   # restore_outputs starts with unit 0's Enable: the sent image is meant to be used
    return updates, notes


def connect(studio: Any, ui: dict) -> None:
    me, quick = ui["controlnet"], ui["quick"]
    cn, names = me["controlnet"], list(FIELDS)

    def run(checkpoint: str, vae: str, *values: Any):
        fields, unit_values = dict(zip(names, values[:len(names)])), values[len(names):]

        def request() -> GenerationRequest:
            units = cn.to_units(*unit_values)
            if not units:
                raise StudioError("No ControlNet unit is enabled.", field="controlnet.units",
                                  fix="drop an image into a unit (that enables it) or tick its Enable box")
            return gen.make_request(checkpoint, vae, fields, controlnet_units=units)
        yield from gen.run_job(studio, me, request)

    defaults = {**GenerationRequest().to_dict(), "checkpoint": "", "vae": "Automatic", **cn.api_defaults}
    gen.api_signature(run, ["checkpoint", "vae", *names, *cn.api_names], defaults)
    me["generate"].click(run, [quick["checkpoint"], quick["vae"], *[me["fields"][n] for n in names],
                               *cn.components],
                         gen.outputs_of(me), api_name="controlnet", show_progress="hidden", concurrency_id="gpu",
                         concurrency_limit=None)
