"""The "Prompts from file" tab: a textbox (or an uploaded .txt) of lines, each run as its own job."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from studio.extension_api import GenerationRequest

from .lines import jobs, run_line


def build(api: Any) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            text = gr.Textbox(label="List of prompt inputs (one job per line)", lines=8, elem_id="pff_prompts",
                              placeholder='a red fox\n--prompt "a blue bird" --steps 10 --seed 5 '
                                          '--negative_prompt "blurry"')
            upload = gr.File(label="…or a .txt file (replaces the text above)", file_types=[".txt"],
                             type="filepath", elem_id="pff_file")
            gr.Markdown("Options per line (A1111's): `--prompt`, `--negative_prompt`, `--seed`, `--steps`, "
                        "`--cfg_scale`, `--sampler_name`, `--scheduler`, `--width`, `--height`, `--batch_size`, "
                        "`--n_iter`, `--clip_skip`, `--checkpoint`, `--subseed`, `--subseed_strength`, "
                        "`--denoising_strength`, `--do_not_save_samples`. Values below are the defaults.")
            negative = gr.Textbox(label="Negative prompt (default)", lines=1, elem_id="pff_neg_prompt")
            with gr.Row():
                samplers = api.samplers()
                sampler = gr.Dropdown(samplers, value="Euler a" if "Euler a" in samplers else samplers[0],
                                      label="Sampling method", elem_id="pff_sampler")
                steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="pff_steps")
                cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG scale", elem_id="pff_cfg")
            with gr.Row():
                width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="pff_width")
                height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="pff_height")
                seed = gr.Number(-1, precision=0, label="Seed", elem_id="pff_seed")
        with gr.Column(scale=2):
            run = gr.Button("Generate", variant="primary", elem_id="pff_generate")
            log = gr.HTML("", elem_id="pff_log")
            gallery = gr.Gallery(label="Results", format="png", columns=3, height="auto", interactive=False,
                                 elem_id="pff_gallery")

    upload.upload(_read_file, upload, text, queue=False, api_visibility="private")

    def generate(*values: Any):
        yield from _run(api, *values)

    run.click(generate, [text, negative, sampler, steps, cfg, width, height, seed], [log, gallery],
              api_name="prompts_from_file", concurrency_id="gpu", concurrency_limit=None)


def _read_file(path: str | None) -> Any:
    if not path:
        return gr.update()
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _run(api: Any, text: str, negative: str, sampler: str, steps: float, cfg: float, width: float,
         height: float, seed: float):
    base = GenerationRequest(negative_prompt=negative or "", sampler_name=sampler, steps=int(steps),
                             cfg_scale=float(cfg), width=int(width), height=int(height),
                             seed=int(seed if seed is not None else -1))
    todo = jobs(text)
    if not todo:
        yield "<div class='studio-error'>⚠ No lines to run: type one prompt per line.</div>", []
        return
    rows, images = [], []
    for i, (number, line) in enumerate(todo):
        yield _log(rows + [f"<li>line {number}: running ({i + 1} of {len(todo)}) …</li>"]), images
        done = run_line(api, base, number, line)
        if done.error:
            rows.append(f"<li class='pff-error'>⚠ line {number}: {html.escape(done.error)}</li>")
        else:
            rows.append(f"<li>line {number}: {len(done.images)} image(s)</li>")
            images = images + [(im, f"line {number}") for im in done.images]
    yield _log(rows), images


def _log(rows: list[str]) -> str:
    return "<ul class='pff-log'>" + "".join(rows) + "</ul>"
