"""txt2img: prompt boxes, generation parameters, hires fix, live progress and the result gallery.

Generate goes through ``studio.submit`` (the engine's single FIFO queue shared with the REST API), then a
generator polls the Job for progress and previews (``webui.generation``). Interrupt / Skip act on this page's
job at once (``queue=False``); with no job of its own the page stops the running job, as A1111 does.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from studio.request import GenerationRequest
from studio.samplers import SAMPLERS, SCHEDULE_TYPES
from webui import generation as gen
from webui.common import TokenCounter
from webui.controlnet_ui import controlnet_units_ui
from webui.extra_networks import extra_networks_panel

FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "distilled_cfg_scale",
          "width", "height", "n_iter", "batch_size", "seed", "subseed", "subseed_strength", "clip_skip",
          "enable_hr", "hr_upscaler", "hr_second_pass_steps", "hr_denoising_strength", "hr_scale", "hr_resize_x",
          "hr_resize_y", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt")


def build(studio: Any) -> dict:
    """Lay out the tab; Generate (it needs the quicksettings) is wired in :func:`connect`."""
    me = gen.prompt_row("txt2img", TokenCounter(studio))
    me["extra_networks"] = extra_networks_panel(studio, me["fields"]["prompt"], "txt2img")
    f = me["fields"]
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            seed_buttons = gen.sampling_options("txt2img", studio, f)
            hires = _hires_fix(studio, f)
            me["controlnet"] = controlnet_units_ui(studio, "txt2img", size=(f["width"], f["height"]))
        with gr.Column(scale=1):
            me.update(gen.output_panel("txt2img", studio, "txt2img"))
    size_inputs = [f[n] for n in ("width", "height", "hr_scale", "hr_resize_x", "hr_resize_y")]
    for component in size_inputs:
        component.change(_hires_size, size_inputs, hires, show_progress="hidden", **gen.HIDDEN)
    gen.wire_controls(studio, me, seed_buttons)
    me["send_inputs"] = [me["results"]]
    me["send_pick"] = gen.selected
    return me


def _hires_fix(studio: Any, f: dict) -> Any:
    """A1111's "Hires. fix" block: a second pass at a larger size. Returns the "from → to" size label."""
    s, d = studio.settings, GenerationRequest()
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hires"):
        with gr.Row():
            f["enable_hr"] = gr.Checkbox(False, label="Enable hires fix", elem_id="txt2img_enable_hr")
            size = gr.HTML(_hires_size(d.width, d.height, d.hr_scale, 0, 0), elem_id="txt2img_hires_size")
        with gr.Row():
            f["hr_upscaler"] = gr.Dropdown(studio.engine.upscalers.names(), value=d.hr_upscaler, label="Upscaler",
                                           elem_id="txt2img_hr_upscaler")
            f["hr_second_pass_steps"] = gr.Slider(0, s.max_steps, value=0, step=1, label="Hires steps",
                                                  info="0: same as sampling steps", elem_id="txt2img_hires_steps")
        with gr.Row():
            f["hr_denoising_strength"] = gr.Slider(0, 1, value=d.hr_denoising_strength, step=0.01,
                                                   label="Denoising strength", elem_id="txt2img_hr_denoising")
            f["hr_scale"] = gr.Slider(1, 4, value=d.hr_scale, step=0.05, label="Upscale by",
                                      elem_id="txt2img_hr_scale")
        with gr.Row():
            f["hr_resize_x"] = gr.Slider(0, s.max_width, value=0, step=8, label="Resize width to",
                                         info="0: use 'Upscale by'", elem_id="txt2img_hr_resize_x")
            f["hr_resize_y"] = gr.Slider(0, s.max_height, value=0, step=8, label="Resize height to",
                                         info="0: use 'Upscale by'", elem_id="txt2img_hr_resize_y")
        with gr.Row():
            f["hr_sampler_name"] = gr.Dropdown([("Use same sampler", ""), *[(n, n) for n in SAMPLERS]], value="",
                                               label="Hires sampling method", elem_id="txt2img_hr_sampler")
            f["hr_scheduler"] = gr.Dropdown([("Use same scheduler", ""), *[(n, n) for n in SCHEDULE_TYPES]],
                                            value="", label="Hires schedule type", elem_id="txt2img_hr_scheduler")
        with gr.Row():
            f["hr_prompt"] = gr.Textbox("", label="Hires prompt (empty: same)", lines=2, elem_id="txt2img_hr_prompt")
            f["hr_negative_prompt"] = gr.Textbox("", label="Hires negative prompt (empty: same)", lines=2,
                                                 elem_id="txt2img_hr_neg_prompt")
    return size


def _hires_size(width: Any, height: Any, scale: Any, rx: Any, ry: Any) -> str:
    try:
        r = GenerationRequest(width=int(width), height=int(height), hr_scale=float(scale), hr_resize_x=int(rx or 0),
                              hr_resize_y=int(ry or 0))
        w, h = r.hr_size
    except (TypeError, ValueError, ZeroDivisionError):
        return ""
    return f"<span class='studio-note'>from {int(width)}×{int(height)} to <b>{w}×{h}</b></span>"


def connect(studio: Any, ui: dict) -> None:
    """Wire Generate: its inputs include the checkpoint and VAE from the quicksettings row."""
    me, quick = ui["txt2img"], ui["quick"]
    names, cn = list(FIELDS), me["controlnet"]

    def run(checkpoint: str, vae: str, *values: Any):
        fields, units = dict(zip(names, values[:len(names)])), values[len(names):]
        yield from gen.run_job(studio, me, lambda: gen.make_request(checkpoint, vae, fields,
                                                                    controlnet_units=cn.to_units(*units)))

    defaults = {**GenerationRequest().to_dict(), "checkpoint": "", "vae": "Automatic", **cn.api_defaults}
    gen.api_signature(run, ["checkpoint", "vae", *names, *cn.api_names], defaults)
    me["generate"].click(run, [quick["checkpoint"], quick["vae"], *[me["fields"][n] for n in names],
                               *cn.components],
                         gen.outputs_of(me), api_name="txt2img", show_progress="hidden", concurrency_id="gpu",
                         concurrency_limit=None)
    # concurrency_limit=None: the engine's queue already runs one job at a time, in submission order, for UI and
    # REST alike; letting every page submit at once shows each its true queue position and keeps
    # Interrupt/Skip per page.
