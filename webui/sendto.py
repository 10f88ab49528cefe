""""Send to": the selected image of a gallery (or PNG Info's image) and its parameters go to another tab.

A source tab's dict has ``send`` ({target id: Button}), ``send_inputs`` (components) and
``send_pick(*values) -> (image path | None, infotext)``. A target tab's dict has ``receive``:
``{"outputs": [components], "names": [request field names], "fill": fn(path, values) -> [updates]}`` and
optionally ``"from_text": ([components], fn(infotext) -> ([updates], [notes]))`` (ControlNet units).
Any tab can be a source or a target, so ControlNet only needs a ``receive`` (and a button in SEND_TARGETS).
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.infotext import params_to_request_fields, parse_infotext
from studio.request import GenerationRequest
from studio.samplers import SAMPLERS, SCHEDULE_TYPES
from webui.common import note_html


def choices(studio: Any) -> dict[str, list]:
    """Fields whose value must be one of the UI's choices (an unknown one falls back to the default)."""
    return {"sampler_name": list(SAMPLERS), "scheduler": list(SCHEDULE_TYPES),
            "hr_upscaler": studio.engine.upscalers.names(), "hr_sampler_name": ["", *SAMPLERS],
            "hr_scheduler": ["", *SCHEDULE_TYPES]}


def fields_from_text(studio: Any, text: str, names: list[str], *,
                     fill_defaults: bool) -> tuple[dict, str | None, list[str]]:
    """Infotext -> (field values, checkpoint title or None, notes for the user).

    ``fill_defaults``: every name gets a value (defaults for what the text lacks), as PNG Info -> txt2img does;
    otherwise only what the text says (the target tab keeps the rest).
    """
    if not (text or "").strip():
        if fill_defaults:
            raise StudioError("There are no parameters to send.", field="parameters",
                              fix="drop a PNG made by the studio or AUTOMATIC1111, or paste its infotext")
        return {}, None, []
    parsed = parse_infotext(text)
    given = params_to_request_fields(parsed)
    defaults = GenerationRequest().to_dict()
    values = ({n: given.get(n, defaults[n]) for n in names} if fill_defaults
              else {n: given[n] for n in names if n in given})
    notes = []
    for name, known in choices(studio).items():
        if name in values and values[name] not in known:
            notes.append(f"{values[name]!r} is not available here; {defaults[name] or 'the default'!r} was used "
                         "instead.")
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


def image_size(path: str, studio: Any) -> tuple[int, int] | None:
    """The image's size as W×H fields: multiples of 8 within the limits (None when it cannot be read)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, ValueError):
        return None
    s = studio.settings
    return (min(s.max_width, max(64, round(w / 8) * 8)), min(s.max_height, max(64, round(h / 8) * 8)))


def connect(studio: Any, ui: dict) -> None:
    """Wire every source's Send buttons to the targets present in this page."""
    for source_id, source in ui.items():
        if not isinstance(source, dict) or "send" not in source:
            continue
        for target_id, button in source["send"].items():
            target = ui.get(target_id)
            if not isinstance(target, dict) or "receive" not in target:
                button.visible = False  # the target tab is not in this build (yet)
                continue
            _wire(studio, ui, source, target_id, target["receive"], button)


def _wire(studio: Any, ui: dict, source: dict, target_id: str, receive: dict, button: Any) -> None:
    checkpoint_box, tabs, note = ui["quick"]["checkpoint"], ui["tabs"], ui[target_id].get("note")
    # optional (outputs, fn(infotext) -> (updates, notes)): what needs the whole text, e.g. ControlNet units
    from_text = receive.get("from_text")
    text_outputs = list(from_text[0]) if from_text else []
    outputs = [*receive["outputs"], *text_outputs, checkpoint_box, tabs] + ([note] if note is not None else [])
    keep = [gr.update() for _ in outputs]

    def send(*values: Any) -> list:
        path, text = source["send_pick"](*values)
        if not path:
            gr.Warning("Nothing to send: make or select an image first.")
            return keep
        try:
            fields, checkpoint, notes = fields_from_text(studio, text, receive["names"], fill_defaults=False)
        except StudioError as exc:   # a broken infotext still sends the image
            fields, checkpoint, notes = {}, None, [f"Parameters not sent: {exc}"]
        out = list(receive["fill"](path, fields))
        if from_text:
            updates, more = from_text[1](text)
            out, notes = out + list(updates), notes + list(more)
        out += [checkpoint or gr.update(), gr.Tabs(selected=target_id)]
        if note is not None:
            out.append(note_html(" ".join(notes)) if notes else "")
        return out

    button.click(send, source["send_inputs"], outputs, queue=False, api_visibility="private")
