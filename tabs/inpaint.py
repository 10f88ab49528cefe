"""Inpaint: paint a mask over an image in the browser and regenerate only that area (A1111's inpaint sub-tab,
promoted to a tab). Sub-tabs: Inpaint (white mask brush), Inpaint sketch (coloured strokes are both the new
content and the mask) and Inpaint upload (image + separate mask). Outpainting grows the canvas and fills the
new border, so an image can be extended step by step ("Send to inpaint" puts a result back in the painter).
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.masking import outpaint_canvas
from studio.request import GenerationRequest
from webui import generation as gen
from webui import imageinputs as ii
from webui.common import TokenCounter
from webui.controlnet_ui import controlnet_units_ui
from webui.extra_networks import extra_networks_panel
from webui.sendto import image_size

FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "distilled_cfg_scale",
          "width", "height", "n_iter", "batch_size", "seed", "subseed", "subseed_strength", "clip_skip", "resize_mode",
          "denoising_strength", "mask_blur", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res",
          "inpaint_full_res_padding")
MODES = ("Inpaint", "Inpaint sketch", "Inpaint upload")
SIDES = ("left", "right", "up", "down")
MASK_HELP = ("Paint over what should change with the brush (click the brush tool again for its size); the "
             "eraser takes paint away, the bin clears it all. The white paint is the mask.")


def build(studio: Any) -> dict:
    me = gen.prompt_row("inpaint", TokenCounter(studio))
    me["extra_networks"] = extra_networks_panel(studio, me["fields"]["prompt"], "inpaint")
    f = me["fields"]
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            me["mode"] = gr.Textbox("Inpaint", visible=False, elem_id="inpaint_mode")
            with gr.Tabs(elem_id="inpaint_mode_tabs") as me["mode_tabs"]:
                with gr.Tab("Inpaint", id="inpaint_mask") as t_mask:
                    me["editor"] = ii.editor("inpaint_editor", "Image and mask")
                    gr.Markdown(MASK_HELP, elem_classes=["studio-note"])
                with gr.Tab("Inpaint sketch", id="inpaint_sketch") as t_sketch:
                    me["sketch"] = ii.editor("inpaint_sketch", "Coloured strokes: new content and mask",
                                             colours=ii.SKETCH_COLOURS)
                with gr.Tab("Inpaint upload", id="inpaint_upload") as t_upload:
                    with gr.Row():
                        me["upload_image"] = gr.Image(label="Image", type="pil", image_mode="RGBA", format="png",
                                                      sources=["upload", "clipboard"], elem_id="inpaint_upload_image")
                        me["upload_mask"] = gr.Image(label="Mask (white = change)", type="pil", image_mode=None,
                                                     format="png", sources=["upload", "clipboard"],
                                                     elem_id="inpaint_upload_mask")
            for tab, mode in zip((t_mask, t_sketch, t_upload), MODES):
                tab.select(lambda m=mode: m, None, me["mode"], **gen.HIDDEN)
            ii.inpaint_options("inpaint", f)
            me.update(ii.resize_block("inpaint", studio, f))
            seed_buttons = gen.sampling_options("inpaint", studio, f, size=False,
                                                extra=lambda fields: ii.denoising("inpaint", fields))
            with gr.Accordion("Outpainting", open=False, elem_id="inpaint_outpainting"):
                gr.Markdown("Extend the image by N pixels (multiples of 8) on each side; the new border is filled "
                            "and inpainted with the prompt above. Send the result back to inpaint to grow it "
                            "again.", elem_classes=["studio-note"])
                me["outpaint"] = {}
                for pair in (SIDES[:2], SIDES[2:]):
                    with gr.Row():
                        for side in pair:
                            me["outpaint"][side] = gr.Slider(0, 512, value=0, step=8, label=f"Extend {side}",
                                                             elem_id=f"inpaint_outpaint_{side}")
                me["outpaint_button"] = gr.Button("Outpaint", variant="primary", elem_id="inpaint_outpaint")
            me["controlnet"] = controlnet_units_ui(studio, "inpaint", size=(f["width"], f["height"]),
                                                   init=me["editor"], init_label="inpaint")
        with gr.Column(scale=1):
            me.update(gen.output_panel("inpaint", studio, "img2img"))
    gen.wire_controls(studio, me, seed_buttons)
    for component in (me["editor"], me["sketch"], me["upload_image"]):
        component.upload(lambda v: ii.size_of_upload(studio, v), component, [f["width"], f["height"]],
                         **gen.HIDDEN)
    me["scale_by"].change(lambda *v: ii.scaled_label(_source(*v[:4])[0], v[4], studio),
                          [*_image_inputs(me), me["scale_by"]], me["scaled"], show_progress="hidden", **gen.HIDDEN)
    me["send_inputs"] = [me["results"]]
    me["send_pick"] = gen.selected
    me["receive"] = {"outputs": [me["editor"], me["mode_tabs"], me["mode"], f["width"], f["height"],
                                 *[f[n] for n in _SENT]],
                     "names": list(_SENT), "fill": lambda path, values: _receive(studio, path, values)}
    return me


_SENT = tuple(n for n in FIELDS if n not in ("width", "height"))


def _image_inputs(me: dict) -> list:
    return [me["mode"], me["editor"], me["sketch"], me["upload_image"]]


def _source(mode: str, editor: Any, sketch: Any, upload: Any) -> tuple[Any, Any]:
    """(init image, the editor value or None) for the active sub-tab."""
    if mode == "Inpaint sketch":
        return ii.composite(sketch), sketch
    if mode == "Inpaint upload":
        return upload, None
    return ii.background(editor), editor


def _receive(studio: Any, path: str, values: dict) -> list:
    size = image_size(path, studio)
    # a fresh painter: the sent image as background, no strokes
    return [{"background": path, "layers": [], "composite": path}, gr.Tabs(selected="inpaint_mask"), "Inpaint",
            size[0] if size else gr.update(), size[1] if size else gr.update(),
            *[values.get(n, gr.update()) for n in _SENT]]


def _inpaint_request(studio: Any, checkpoint: str, vae: str, mode: str, editor: Any, sketch: Any, upload: Any,
                     upload_mask: Any, fields: dict, size_mode: str, scale_by: Any) -> GenerationRequest:
    image, value = _source(mode, editor, sketch, upload)
    if image is None:
        raise StudioError("Inpaint needs an image.", field="init_images",
                          fix="drop an image into the painter (or send one from a gallery)")
    if mode == "Inpaint upload":
        mask = upload_mask
        if mask is None:
            raise StudioError("Inpaint upload needs a mask image.", field="mask",
                              fix="drop a black-and-white mask (white = change) next to the image")
    else:
        mask = ii.stroke_mask(value)   # all black when nothing is painted: the engine then says so
    w, h = ii.size_for(image, size_mode, scale_by, fields["width"], fields["height"], studio)
    return gen.make_request(checkpoint, vae, {**fields, "width": w, "height": h}, mode="inpaint",
                            init_images=(image,), mask=mask)


def _outpaint_request(studio: Any, checkpoint: str, vae: str, mode: str, editor: Any, sketch: Any, upload: Any,
                      fields: dict, sides: dict) -> GenerationRequest:
    image, _ = _source(mode, editor, sketch, upload)
    if image is None:
        raise StudioError("Outpainting needs an image.", field="init_images", fix="drop an image into the painter")
    grow = {k: int(v or 0) // 8 * 8 for k, v in sides.items()}
    if not any(grow.values()):
        raise StudioError("Choose how far to extend the image.", field="outpaint",
                          fix="set at least one of left / right / up / down to 8 pixels or more")
    # the canvas must be a multiple of 8: the remainder goes to an extended side, so old pixels are not resized
    for axis, (first, second), length in (("x", ("right", "left"), image.width), ("y", ("down", "up"), image.height)):
        extra = -(length + grow[first] + grow[second]) % 8
        if extra and (grow[first] or grow[second]):
            grow[first if grow[first] else second] += extra
    canvas, mask = outpaint_canvas(image, grow["left"], grow["right"], grow["up"], grow["down"])
    w, h = canvas.size
    if w % 8 or h % 8:   # no extension along an axis whose length is not a multiple of 8
        w, h = w // 8 * 8, h // 8 * 8
    values = {**fields, "width": w, "height": h, "inpainting_fill": 0, "inpainting_mask_invert": 0,
              "inpaint_full_res": 0}
    return gen.make_request(checkpoint, vae, values, mode="inpaint", init_images=(canvas,), mask=mask,
                            extra_infotext=(("Outpaint", " ".join(f"{k} {v}" for k, v in grow.items() if v)),))


def connect(studio: Any, ui: dict) -> None:
    me, quick = ui["inpaint"], ui["quick"]
    names = list(FIELDS)
    head = ["checkpoint", "vae", "mode", "image", "sketch", "upload_image", "upload_mask"]

    def run(checkpoint: str, vae: str, mode: str, editor: Any, sketch: Any, upload: Any, upload_mask: Any,
            *values: Any):
        fields = dict(zip(names, values[:len(names)]))
        size_mode, scale_by = values[len(names):len(names) + 2]
        units = values[len(names) + 2:]   # the ControlNet units' values (controlnet_ui order)
        yield from gen.run_job(studio, me, lambda: _inpaint_request(
            studio, checkpoint, vae, mode, editor, sketch, upload, upload_mask, fields, size_mode, scale_by
        ).replace(controlnet_units=me["controlnet"].to_units(*units)))

    def outpaint(checkpoint: str, vae: str, mode: str, editor: Any, sketch: Any, upload: Any, *values: Any):
        fields = dict(zip(names, values[:len(names)]))
        sides = dict(zip(SIDES, values[len(names):]))
        yield from gen.run_job(studio, me, lambda: _outpaint_request(
            studio, checkpoint, vae, mode, editor, sketch, upload, fields, sides))

    defaults = {**GenerationRequest().to_dict(), "checkpoint": "", "vae": "Automatic", "mode": "Inpaint",
                "size_mode": "Resize to", "scale_by": 1.0, "inpaint_full_res": 0, **{s: 0 for s in SIDES}}
    gen.api_signature(run, [*head, *names, "size_mode", "scale_by", *me["controlnet"].api_names],
                      {**defaults, **me["controlnet"].api_defaults})
    gen.api_signature(outpaint, [*head[:-1], *names, *SIDES], defaults)
    common = [quick["checkpoint"], quick["vae"], me["mode"], me["editor"], me["sketch"], me["upload_image"]]
    fields = [me["fields"][n] for n in names]
    device = dict(show_progress="hidden", concurrency_id="gpu", concurrency_limit=None)
    me["generate"].click(run, [*common, me["upload_mask"], *fields, me["size_mode"], me["scale_by"],
                               *me["controlnet"].components],
                         gen.outputs_of(me), api_name="inpaint", **device)
    me["outpaint_button"].click(outpaint, [*common, *fields, *[me["outpaint"][s] for s in SIDES]],
                                gen.outputs_of(me), api_name="outpaint", **device)

