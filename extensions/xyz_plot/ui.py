"""The X/Y/Z plot tab. Each cell runs through ``api.generate`` (the shared queue) from the event handler."""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from studio.extension_api import GenerationRequest, StudioError

from .xyz import AXIS_TYPES, Plot, parse_axis

AXIS_DEFAULTS = (("Seed", "1, 2"), ("Nothing", ""), ("Nothing", ""))


def build(api: Any) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="xyz_prompt",
                                placeholder="a castle on a hill, <lora:style:0.5> (Prompt S/R can vary the 0.5)")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="xyz_neg_prompt")
            with gr.Row():
                samplers = api.samplers()
                sampler = gr.Dropdown(samplers, value="Euler a" if "Euler a" in samplers else samplers[0],
                                      label="Sampling method", elem_id="xyz_sampler")
                scheduler = gr.Dropdown(api.schedulers(), value="Automatic", label="Schedule type",
                                        elem_id="xyz_scheduler")
                steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="xyz_steps")
                cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG scale", elem_id="xyz_cfg")
            with gr.Row():
                width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="xyz_width")
                height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="xyz_height")
                seed = gr.Number(-1, precision=0, label="Seed (-1: one random seed for every cell)",
                                 elem_id="xyz_seed")
            axes = []
            for i, (name, (kind, values)) in enumerate(zip("XYZ", AXIS_DEFAULTS)):
                with gr.Row():
                    axes.append(gr.Dropdown(list(AXIS_TYPES), value=kind, label=f"{name} type", scale=1,
                                            elem_id=f"xyz_{name.lower()}_type"))
                    axes.append(gr.Textbox(value=values, label=f"{name} values", scale=3, lines=1, max_lines=1,
                                           elem_id=f"xyz_{name.lower()}_values",
                                           placeholder='1, 2, 3 · 1-5 (+2) · 1-10 [5] · "a, b", c'))
            gr.Markdown("Ranges: `1-5` · `1-5 (+2)` step · `1-10 [5]` count. Prompt S/R: the first value is "
                        "searched for in the prompt and replaced by each value (e.g. `0.5, 0.8, 1` over "
                        "`<lora:x:0.5>`). One image per cell; the grid goes to outputs/txt2img-grids/.")
        with gr.Column(scale=2):
            run = gr.Button("Generate grid", variant="primary", elem_id="xyz_generate")
            status = gr.HTML("", elem_id="xyz_status")
            gallery = gr.Gallery(label="Grid and cells", format="png", columns=3, height="auto",
                                 interactive=False, elem_id="xyz_gallery")
            info = gr.Textbox(label="Infotext of the selected image", lines=4, interactive=False,
                              elem_id="xyz_infotext")
    infotexts = gr.State([])

    def generate(*values: Any):
        yield from _run(api, *values)

    run.click(generate, [prompt, negative, sampler, scheduler, steps, cfg, width, height, seed, *axes],
              [status, gallery, infotexts, info], api_name="xyz_plot", concurrency_id="gpu",
              concurrency_limit=None)  # the studio's queue runs one job at a time already
    gallery.select(_selected, infotexts, info, queue=False, api_visibility="private")


def _selected(infotexts: list, evt: gr.SelectData) -> str:
    return infotexts[evt.index] if 0 <= evt.index < len(infotexts) else ""


def _note(text: str, error: bool = False) -> str:
    style = "studio-error" if error else "studio-note"
    return f"<div class='{style}'>{'⚠ ' if error else ''}{html.escape(text)}</div>"


def _run(api: Any, prompt: str, negative: str, sampler: str, scheduler: str, steps: float, cfg: float,
         width: float, height: float, seed: float, *axis_values: str):
    try:
        base = GenerationRequest(prompt=prompt or "", negative_prompt=negative or "", sampler_name=sampler,
                                 scheduler=scheduler, steps=int(steps), cfg_scale=float(cfg), width=int(width),
                                 height=int(height), seed=int(seed if seed is not None else -1))
        lists = {"samplers": api.samplers, "schedulers": api.schedulers, "checkpoints": api.checkpoints}
        axes = [parse_axis(kind, text, lambda name: lists[name]())
                for kind, text in zip(axis_values[::2], axis_values[1::2])]
        plot = Plot(api, base, axes)
    except StudioError as exc:
        yield _note(str(exc), error=True), [], [], ""
        return
    cells: list = []
    total = len(plot.cells)
    for i in range(total):
        yield _note(f"Cell {i + 1} of {total} …"), cells, plot.infotexts, ""
        try:
            image, _ = plot.run_cell(i)
        except Exception as exc:  # noqa: BLE001 - show the message; cells made so far stay visible
            yield _note(f"Cell {i + 1}: {exc}", error=True), cells, plot.infotexts, ""
            return
        cells = cells + [(image, plot.caption(i))]
    grid, path = plot.finish()
    yield (_note(f"{total} cells; grid saved to {path}"), [(grid, "grid")] + cells, [plot.infotexts[0]]
           + plot.infotexts, plot.infotexts[0])
