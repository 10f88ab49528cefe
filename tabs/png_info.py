"""PNG Info: read the A1111 "parameters" of a dropped image (ours or A1111's) and send them to txt2img, or the
image with its parameters to img2img / Inpaint."""
from __future__ import annotations

import html
import re
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.infotext import parse_infotext, read_infotext
from webui.common import error_html, note_html
from webui.generation import SEND_TARGETS
from webui.sendto import fields_from_text

_KEY = re.compile(r"^(.*?)(?:-[12])?$")


def build(studio: Any) -> dict:
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Source", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="pnginfo_image", height=420)
        with gr.Column():
            text = gr.Textbox(label="Parameters (you can also paste an infotext here)", lines=6,
                              elem_id="pnginfo_parameters", interactive=True)
            message = gr.HTML("", elem_id="pnginfo_message")
            table = gr.HTML("", elem_id="pnginfo_table")
            with gr.Row():
                send = gr.Button("Send to txt2img", variant="primary", elem_id="pnginfo_send_txt2img")
                others = {target: gr.Button(label, elem_id=f"pnginfo_send_{target}")
                          for target, label in SEND_TARGETS}
    image.change(_read_image, image, [text, table, message], api_name="png_info", show_progress="hidden")
    text.input(_table_only, text, [table, message], queue=False, api_visibility="private",
               trigger_mode="always_last")
    # "Send to img2img / inpaint" (webui.sendto): the dropped file and the (possibly edited) parameters
    return {"image": image, "text": text, "table": table, "message": message, "send_txt2img": send,
            "send": others, "send_inputs": [image, text], "send_pick": lambda path, txt: (path, txt or "")}


def connect(studio: Any, ui: dict) -> None:
    """Send to txt2img fills every txt2img field (defaults for what the text lacks) and opens the tab."""
    me, target = ui["png_info"], ui["txt2img"]
    names, cn = list(target["fields"]), target.get("controlnet")
    units_out = cn.restore_outputs if cn is not None else []   # ControlNet N keys -> txt2img's units
    outputs = [*[target["fields"][n] for n in names], *units_out, ui["quick"]["checkpoint"], ui["tabs"],
               me["message"]]

    def send(text: str):
        try:
            values, checkpoint, notes = fields_from_text(studio, text, names, fill_defaults=True)
        except StudioError as exc:
            return [gr.update() for _ in [*names, *units_out]] + [gr.update(), gr.update(), error_html(str(exc))]
        units, more = cn.restore(text, reset=True) if cn is not None else ([], [])
        notes += more
        return ([values[n] for n in names] + units
                + [checkpoint if checkpoint else gr.update(), gr.Tabs(selected="txt2img"),
                   note_html(" ".join(notes)) if notes else ""])

    me["send_txt2img"].click(send, me["text"], outputs, queue=False, api_visibility="private")


def _read_image(path: str | None):
    if not path:
        return "", "", ""
    try:
        text = read_infotext(path)
    except Exception as exc:  # noqa: BLE001 - a broken upload gets a message, not a traceback
        return "", "", error_html(f"Could not read this image: {exc}")
    if not text:
        return "", "", note_html("This image has no generation parameters (no PNG 'parameters' chunk or EXIF "
                                 "UserComment). Images re-saved by other programs often lose them.")
    table, message = _table_only(text)
    return text, table, message


def _table_only(text: str):
    if not (text or "").strip():
        return "", ""
    try:
        parsed = parse_infotext(text)
    except Exception as exc:  # noqa: BLE001
        return "", error_html(f"Could not parse the parameters: {exc}")
    rows = []
    for key, value in parsed.items():
        base = _KEY.match(key).group(1)
        if key.endswith("-2") and f"{base}-1" in parsed:
            continue
        if key.endswith("-1") and f"{base}-2" in parsed:  # "Size-1"/"Size-2" show as the text has it: 64x72
            key, value = base, f"{value}x{parsed[f'{base}-2']}"
        # parse_infotext adds A1111's defaults for absent keys; show only what the text says
        if key not in ("Prompt", "Negative prompt") and base not in text:
            continue
        if key in ("Prompt", "Negative prompt") and not value:
            continue
        rows.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>")
    return f"<table class='studio-params'>{''.join(rows)}</table>", ""
