"""img2img: an init image (drop, paste or "Send to img2img"), resize modes, denoising strength and all txt2img
sampling options. Sub-tabs: img2img, Sketch (coloured strokes; the drawing is the init image) and Batch (a folder
or dropped files in, a folder out, through ``studio.batch``).
"""
from __future__ import annotations

import threading
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.infotext import read_infotext
from studio.request import GenerationRequest
from webui import generation as gen
from webui import imageinputs as ii
from webui.common import TokenCounter, error_html, note_html
from webui.controlnet_ui import controlnet_units_ui
from webui.extra_networks import extra_networks_panel
from webui.sendto import image_size

FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "distilled_cfg_scale",
          "width", "height", "n_iter", "batch_size", "seed", "subseed", "subseed_strength", "clip_skip", "resize_mode",
          "denoising_strength")
MODES = ("img2img", "Sketch", "Batch")
BATCH_SHOWN = 32   # batch outputs shown in the gallery (all of them are in the output folder)


def build(studio: Any) -> dict:
    me = gen.prompt_row("img2img", TokenCounter(studio))
    me["extra_networks"] = extra_networks_panel(studio, me["fields"]["prompt"], "img2img")
    f = me["fields"]
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            me["mode"] = gr.Textbox("img2img", visible=False, elem_id="img2img_mode")
            with gr.Tabs(elem_id="img2img_mode_tabs") as me["mode_tabs"]:
                with gr.Tab("img2img", id="img2img_img2img") as t_img:
                    me["image"] = gr.Image(label="Image for img2img", type="pil", image_mode="RGBA", format="png",
                                           sources=["upload", "clipboard"], elem_id="img2img_image", height=420)
                with gr.Tab("Sketch", id="img2img_sketch") as t_sketch:
                    me["sketch"] = ii.editor("img2img_sketch", "Sketch (the drawing becomes the init image)",
                                             colours=ii.SKETCH_COLOURS)
                with gr.Tab("Batch", id="img2img_batch") as t_batch:
                    me["batch"] = _batch_inputs()
            for tab, mode in zip((t_img, t_sketch, t_batch), MODES):
                tab.select(lambda m=mode: m, None, me["mode"], **gen.HIDDEN)
            me.update(ii.resize_block("img2img", studio, f))
            seed_buttons = gen.sampling_options("img2img", studio, f, size=False,
                                                extra=lambda fields: ii.denoising("img2img", fields))
            me["controlnet"] = controlnet_units_ui(studio, "img2img", size=(f["width"], f["height"]),
                                                   init=me["image"])
        with gr.Column(scale=1):
            me.update(gen.output_panel("img2img", studio, "img2img"))
    gen.wire_controls(studio, me, seed_buttons)
    for component in (me["image"], me["sketch"]):
        component.upload(lambda v: ii.size_of_upload(studio, v), component, [f["width"], f["height"]],
                         **gen.HIDDEN)
    scale_inputs = [me["mode"], me["image"], me["sketch"], me["scale_by"]]
    me["scale_by"].change(lambda *v: ii.scaled_label(_init_image(*v[:3]), v[3], studio), scale_inputs,
                          me["scaled"], show_progress="hidden", **gen.HIDDEN)
    me["send_inputs"] = [me["results"]]
    me["send_pick"] = gen.selected
    me["receive"] = {"outputs": [me["image"], me["mode_tabs"], me["mode"], f["width"], f["height"],
                                 *[f[n] for n in FIELDS if n not in ("width", "height")]],
                     "names": [n for n in FIELDS if n not in ("width", "height")],
                     "fill": lambda path, values: _receive(studio, path, values)}
    return me


def _batch_inputs() -> dict:
    b: dict[str, Any] = {}
    gr.Markdown("Process every image of a folder on the server, or the files dropped here. Outputs keep the input "
                "file names. A file with a mask of the same name in the mask folder is inpainted.")
    b["input_dir"] = gr.Textbox("", label="Input folder", elem_id="img2img_batch_input_dir")
    b["files"] = gr.File(file_count="multiple", type="filepath", label="…or drop files here",
                         elem_id="img2img_batch_files", height=120)
    b["output_dir"] = gr.Textbox("", label="Output folder", elem_id="img2img_batch_output_dir")
    b["mask_dir"] = gr.Textbox("", label="Inpaint mask folder (optional)", elem_id="img2img_batch_mask_dir")
    b["use_png_info"] = gr.Checkbox(False, label="Take prompt, seed, steps, sampler and CFG from each file's PNG "
                                                 "info (prompts are appended to the ones above)",
                                    elem_id="img2img_batch_use_png_info")
    return b


def _init_image(mode: str, image: Any, sketch: Any) -> Any:
    return ii.composite(sketch) if mode == "Sketch" else image


def _receive(studio: Any, path: str, values: dict) -> list:
    size = image_size(path, studio)
    names = [n for n in FIELDS if n not in ("width", "height")]
    return [path, gr.Tabs(selected="img2img_img2img"), "img2img",
            size[0] if size else gr.update(), size[1] if size else gr.update(),
            *[values.get(n, gr.update()) for n in names]]


def connect(studio: Any, ui: dict) -> None:
    me, quick, b = ui["img2img"], ui["quick"], ui["img2img"]["batch"]
    names = list(FIELDS)
    extra = ["size_mode", "scale_by", "batch_input_dir", "batch_files", "batch_output_dir", "batch_mask_dir",
             "batch_use_png_info"]

    def run(checkpoint: str, vae: str, mode: str, init_image: Any, sketch: Any, *values: Any):
        fields = dict(zip(names, values[:len(names)]))
        opts = dict(zip(extra, values[len(names):]))
        opts["controlnet"] = values[len(names) + len(extra):]   # the units' values (controlnet_ui order)
        image = _init_image(mode, init_image, sketch)
        if mode == "Batch":
            yield from _run_batch(studio, me, checkpoint, vae, fields, opts)
            return

        def request() -> GenerationRequest:
            if image is None:
                raise StudioError("img2img needs an init image.", field="init_images",
                                  fix="drop an image into the image box (or send one from a gallery)")
            w, h = ii.size_for(image, opts["size_mode"], opts["scale_by"], fields["width"], fields["height"], studio)
            return gen.make_request(checkpoint, vae, {**fields, "width": w, "height": h}, mode="img2img",
                                    init_images=(image,),
                                    controlnet_units=me["controlnet"].to_units(*opts["controlnet"]))
        yield from gen.run_job(studio, me, request)

    defaults = {**GenerationRequest().to_dict(), "checkpoint": "", "vae": "Automatic", "mode": "img2img",
                "size_mode": "Resize to", "scale_by": 1.0, "batch_input_dir": "", "batch_output_dir": "",
                "batch_mask_dir": "", "batch_use_png_info": False}
    defaults.update(me["controlnet"].api_defaults)
    gen.api_signature(run, ["checkpoint", "vae", "mode", "init_image", "sketch", *names, *extra,
                            *me["controlnet"].api_names], defaults)
    inputs = [quick["checkpoint"], quick["vae"], me["mode"], me["image"], me["sketch"],
              *[me["fields"][n] for n in names], me["size_mode"], me["scale_by"], b["input_dir"], b["files"],
              b["output_dir"], b["mask_dir"], b["use_png_info"], *me["controlnet"].components]
    me["generate"].click(run, inputs, gen.outputs_of(me), api_name="img2img", show_progress="hidden",
                         concurrency_id="gpu", concurrency_limit=None)


def _run_batch(studio: Any, me: dict, checkpoint: str, vae: str, fields: dict, opts: dict):
    """studio.batch in a thread (it waits for one job per file); the page polls its progress meanwhile."""
    from studio.batch import confine_batch_paths, run_img2img_batch

    inputs = opts["batch_files"] or (opts["batch_input_dir"] or "").strip()
    now: dict[str, Any] = {"job": None, "text": ""}
    done: dict[str, Any] = {}

    def progress(index: int, total: int, name: str, job: Any) -> None:
        now.update(job=job, text=f"file {index + 1}/{total} ({name}) · ")

    def work() -> None:
        try:
            if not inputs:
                raise StudioError("The batch has no input.", field="input_dir",
                                  fix="enter an input folder or drop files")
            # typed folders must lie inside the studio's folders (studio.paths)
            source, output_dir, mask_dir = confine_batch_paths(studio.settings, inputs, opts["batch_output_dir"],
                                                               opts["batch_mask_dir"] or None)
            base = gen.make_request(checkpoint, vae, fields, mode="img2img",
                                    controlnet_units=me["controlnet"].to_units(*opts["controlnet"]))
            scale = opts["scale_by"] if opts["size_mode"] == "Resize by" else None
            done["report"] = run_img2img_batch(studio, base, source, output_dir, mask_dir,
                                               bool(opts["batch_use_png_info"]), progress, scale_by=scale)
        except Exception as exc:  # noqa: BLE001 - shown on the page
            done["error"] = exc

    thread = threading.Thread(target=work, daemon=True, name="img2img-batch")
    thread.start()
    yield {me["error"]: "", me["info"]: "", me["progress"]: gen.progress_html_text("Starting the batch…")}
    while thread.is_alive():
        thread.join(gen.POLL_SECONDS)
        job = now["job"]
        if job is not None:
            yield {me["progress"]: gen.progress_html(job, now["text"]), me["job_state"]: job.id}
    if "error" in done:
        yield gen.error_update(me, done["error"])
        return
    report = done["report"]
    paths = report.outputs[:BATCH_SHOWN]
    items = [(gen.copy_to_cache(me["gallery"], p), p.rsplit("/", 1)[-1]) for p in paths]
    texts = [read_infotext(p) or "" for p in paths]
    state = {"seeds": [], "infotexts": texts, "paths": [p for p, _ in items], "selected": 0}
    message = note_html(report.summary())
    yield {me["progress"]: "", me["job_state"]: None, me["results"]: state, me["info"]: message,
           me["gallery"]: gr.update(value=items, selected_index=0 if items else None),
           me["error"]: error_html(report.summary()) if report.failed and not report.done else ""}
