"""PNG Info: read the A1111 "parameters" of a dropped image (ours or A1111's) and send them to txt2img."""
from __future__ import annotations

import html
import re
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.infotext import params_to_request_fields, parse_infotext, read_infotext
from studio.request import GenerationRequest
from studio.samplers import SAMPLERS, SCHEDULE_TYPES
from webui.common import error_html, note_html

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
            send = gr.Button("Send to txt2img", variant="primary", elem_id="pnginfo_send_txt2img")
    image.change(_read_image, image, [text, table, message], api_name="png_info", show_progress="hidden")
    text.input(_table_only, text, [table, message], queue=False, api_visibility="private",
               trigger_mode="always_last")
    return {"image": image, "text": text, "table": table, "message": message, "send": send}


def connect(studio: Any, ui: dict) -> None:
    """Send to txt2img fills every txt2img field (defaults for what the text lacks) and opens the tab."""
    me, target = ui["png_info"], ui["txt2img"]
    names = list(target["fields"])
    outputs = [*[target["fields"][n] for n in names], ui["quick"]["checkpoint"], ui["tabs"], me["message"]]

    def send(text: str):
        try:
            values, checkpoint, notes = _fields_from_text(studio, text, names)
        except StudioError as exc:
            return [gr.update() for _ in names] + [gr.update(), gr.update(), error_html(str(exc))]
        return ([values[n] for n in names]
                + [checkpoint if checkpoint else gr.update(), gr.Tabs(selected="txt2img"),
                   note_html(" ".join(notes)) if notes else ""])

    me["send"].click(send, me["text"], outputs, queue=False, api_visibility="private")


def _fields_from_text(studio: Any, text: str, names: list[str]) -> tuple[dict, str | None, list[str]]:
    if not (text or "").strip():
        raise StudioError("There are no parameters to send.", field="parameters",
                          fix="drop a PNG made by the studio or AUTOMATIC1111, or paste its infotext")
    parsed = parse_infotext(text)
    given = params_to_request_fields(parsed)
    defaults = GenerationRequest().to_dict()
    values = {n: given.get(n, defaults[n]) for n in names}
    notes = []
    for name, known in (("sampler_name", SAMPLERS), ("scheduler", SCHEDULE_TYPES)):
        if values[name] not in known:
            notes.append(f"{values[name]!r} is not available here; {defaults[name]!r} was used instead.")
            values[name] = defaults[name]
    checkpoint = None
    wanted = given.get("checkpoint")
    if wanted:
        try:
            checkpoint = studio.registry.find_checkpoint(wanted).title
        except StudioError:
            notes.append(f"The image was made with model {parsed.get('Model') or wanted!r}, which is not in the "
                         "checkpoint folder; the current checkpoint stays selected.")
    return values, checkpoint, notes


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
