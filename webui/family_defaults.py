"""The generation fields follow the selected checkpoint's family (Forge's presets): picking a FLUX.1 model sets
CFG 1, distilled guidance 3.5 and Euler / Simple on every tab; back on SD 1.5 they return to 7 and DPM++ 2M.

A field moves only while it still holds the previous family's value: a value the user chose is theirs. The sizes
follow the same rule in ``demo_ui`` (one handler per slider)."""
from __future__ import annotations

from typing import Any

import gradio as gr

from studio.request import GenerationRequest

FIELDS = ("sampler_name", "scheduler", "steps", "cfg_scale", "distilled_cfg_scale")


def _built_with() -> dict:
    """The values the fields are built with (before any checkpoint's family is known)."""
    d = GenerationRequest()
    return {name: getattr(d, name) for name in FIELDS}


def tab_fields(ui: dict) -> list[tuple[str, Any]]:
    """(field name, component) of every tab's generation fields."""
    out = []
    for me in ui.values():
        fields = me.get("fields") if isinstance(me, dict) else None
        if isinstance(fields, dict):
            out += [(name, fields[name]) for name in FIELDS if name in fields]
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) < 1e-6
    return a == b


def follow(new: dict | None, previous: dict | None, current: list[tuple[str, Any]]) -> tuple[dict, list]:
    """(the values now expected, the value each field gets or None to keep it)."""
    before = {**_built_with(), **(previous or {})}
    if new is None:             # the family cannot be told yet: nothing moves, the expectation stays
        return before, [None] * len(current)
    target = {**before, **{k: new[k] for k in FIELDS if k in new}}
    moved = [target[name] if _same(value, before[name]) and not _same(value, target[name]) else None
             for name, value in current]
    return target, moved


def connect(studio: Any, ui: dict, page_loaded: Any) -> Any:
    """Move the fields when the checkpoint changes (picked, switched by "Load it", installed) and on page load;
    returns the page-load event (the layout chains its readiness marker on it)."""
    picker = ui["quick"]["checkpoint"]
    fields = tab_fields(ui)
    expected = gr.State(None)

    def sync(name, previous, *values):
        target, moved = follow(studio.generation_defaults(name) if name else None, previous,
                               [(n, v) for (n, _), v in zip(fields, values)])
        return [target, *[gr.update(value=v) if v is not None else gr.update() for v in moved]]

    hidden = dict(queue=False, api_visibility="private", show_progress="hidden")
    inputs, outputs = [picker, expected, *[c for _, c in fields]], [expected, *[c for _, c in fields]]
    picker.change(sync, inputs, outputs, **hidden)
    return page_loaded.then(sync, inputs, outputs, **hidden)
