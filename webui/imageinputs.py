"""Image inputs shared by img2img and Inpaint: resize mode + "Resize to / Resize by", denoising strength,
mask painters (gr.ImageEditor) and turning editor values into init image + mask.

The mask is the union of the editor layers' alpha, never their colour (a white stroke on a white wall is still
paint). Layers come back at the uploaded image's full size whatever the canvas size.
"""
from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from studio.errors import StudioError
from studio.request import GenerationRequest, MASKED_CONTENT, RESIZE_MODES
from webui import generation as gen

SKETCH_COLOURS = ("#000000", "#ffffff", "#e11d48", "#f97316", "#facc15", "#16a34a", "#2563eb", "#7c3aed",
                  "#8b5a2b")


def resize_block(prefix: str, studio: Any, f: dict) -> dict:
    """Resize mode radio, then sub-tabs "Resize to" (W×H) / "Resize by" (scale of the image's size)."""
    d = GenerationRequest()
    f["resize_mode"] = gr.Radio([(name, i) for i, name in enumerate(RESIZE_MODES)], value=d.resize_mode,
                                label="Resize mode", elem_id=f"{prefix}_resize_mode")
    size_mode = gr.Textbox("Resize to", visible=False, elem_id=f"{prefix}_size_mode")
    with gr.Tabs(elem_id=f"{prefix}_size_tabs"):
        with gr.Tab("Resize to", id=f"{prefix}_resize_to") as to_tab:
            gen.size_sliders(prefix, studio, f)
        with gr.Tab("Resize by", id=f"{prefix}_resize_by") as by_tab:
            scale = gr.Slider(0.05, 4, value=1, step=0.05, label="Scale", elem_id=f"{prefix}_scale_by")
            scaled = gr.HTML("", elem_id=f"{prefix}_scaled_size")
    to_tab.select(lambda: "Resize to", None, size_mode, **gen.HIDDEN)
    by_tab.select(lambda: "Resize by", None, size_mode, **gen.HIDDEN)
    return {"size_mode": size_mode, "scale_by": scale, "scaled": scaled}


def denoising(prefix: str, f: dict) -> None:
    f["denoising_strength"] = gr.Slider(0, 1, value=GenerationRequest().denoising_strength, step=0.01,
                                        label="Denoising strength", elem_id=f"{prefix}_denoising_strength")


def inpaint_options(prefix: str, f: dict) -> None:
    """A1111's inpaint options block (mask blur, mask mode, masked content, inpaint area, padding)."""
    d = GenerationRequest()
    with gr.Row():
        f["mask_blur"] = gr.Slider(0, 64, value=d.mask_blur, step=1, label="Mask blur",
                                   elem_id=f"{prefix}_mask_blur")
        f["inpainting_mask_invert"] = gr.Radio([("Inpaint masked", 0), ("Inpaint not masked", 1)], value=0,
                                               label="Mask mode (invert)", elem_id=f"{prefix}_mask_mode")
    f["inpainting_fill"] = gr.Radio([(name, i) for i, name in enumerate(MASKED_CONTENT)], value=d.inpainting_fill,
                                    label="Masked content", elem_id=f"{prefix}_inpainting_fill")
    with gr.Row():
        f["inpaint_full_res"] = gr.Radio([("Whole picture", 0), ("Only masked", 1)], value=0, label="Inpaint area",
                                         elem_id=f"{prefix}_inpaint_full_res")
        f["inpaint_full_res_padding"] = gr.Slider(0, 256, value=d.inpaint_full_res_padding, step=4,
                                                  label="Only masked padding, pixels",
                                                  elem_id=f"{prefix}_inpaint_full_res_padding")


def editor(elem_id: str, label: str, *, colours: tuple[str, ...] | None = None, height: int = 420) -> Any:
    """A mask painter (fixed white brush) or, with ``colours``, a sketch editor with a colour picker."""
    white = ("#ffffff", 0.6)   # see-through, so the picture stays visible under the mask; any alpha is mask
    brush = (gr.Brush(colors=list(colours), default_color=colours[2], color_mode="defaults", default_size=8) if colours
             else gr.Brush(colors=[white], default_color=white, color_mode="fixed", default_size=24))
    return gr.ImageEditor(type="pil", image_mode="RGBA", brush=brush, eraser=gr.Eraser(default_size=24),
                          layers=False, transforms=(), sources=["upload", "clipboard"], format="png",
                          canvas_size=(512, 512), label=label, elem_id=elem_id, height=height)


def background(value: Any) -> Image.Image | None:
    """The uploaded image of an editor value (or a plain image)."""
    if isinstance(value, dict):
        return value.get("background")
    return value


def composite(value: Any) -> Image.Image | None:
    """What the user sees: the image with the strokes (the sketch result)."""
    if not isinstance(value, dict):
        return value
    bg = value.get("background")
    if bg is None:
        return value.get("composite")
    out = bg.convert("RGBA")
    for layer in value.get("layers") or []:
        layer = layer.convert("RGBA")
        out = Image.alpha_composite(out, layer if layer.size == out.size else layer.resize(out.size))
    return out


def stroke_mask(value: Any) -> Image.Image | None:
    """"L" mask: white wherever a layer has any alpha (the mask brush is see-through, 60 % white, so the image
    stays visible under it); all black when nothing is painted."""
    bg = background(value)
    if bg is None:
        return None
    alpha = np.zeros((bg.height, bg.width), dtype=np.uint8)
    for layer in (value.get("layers") or []) if isinstance(value, dict) else []:
        if layer is None:
            continue
        a = layer.convert("RGBA").getchannel("A")
        if a.size != bg.size:
            a = a.resize(bg.size, Image.NEAREST)
        alpha = np.maximum(alpha, np.where(np.asarray(a) > 0, 255, 0).astype(np.uint8))
    return Image.fromarray(alpha, "L")


def size_for(image: Image.Image | None, size_mode: str, scale: Any, width: Any, height: Any,
             studio: Any) -> tuple[int, int]:
    """W×H: the sliders for "Resize to"; image size × scale (multiples of 8, within limits) for "Resize by"."""
    if size_mode != "Resize by":
        return int(width), int(height)
    if image is None:
        raise StudioError("'Resize by' needs an image to scale.", field="init_images",
                          fix="drop an image first, or use 'Resize to'")
    s, k = studio.settings, float(scale or 1)
    return (min(s.max_width, max(64, round(image.width * k / 8) * 8)),
            min(s.max_height, max(64, round(image.height * k / 8) * 8)))


def scaled_label(image: Image.Image | None, scale: Any, studio: Any) -> str:
    if image is None:
        return "<span class='studio-note'>Drop an image to see the size.</span>"
    w, h = size_for(image, "Resize by", scale, 0, 0, studio)
    return f"<span class='studio-note'>{image.width}×{image.height} → <b>{w}×{h}</b></span>"


def size_of_upload(studio: Any, value: Any) -> tuple[Any, Any]:
    """On upload, W×H follow the image (rounded to 8) so it is not squashed by a leftover 512×512."""
    image = background(value)
    if image is None:
        return gr.update(), gr.update()
    w, h = size_for(image, "Resize by", 1, 0, 0, studio)
    return w, h
