"""First run and the demo model in the page: the one-click install in the "No checkpoint yet" help, the note that
says what the demo knows (shown while it is the selected checkpoint), and the size sliders following the
selected checkpoint's declared native size (``CheckpointInfo.native_size``; any model that declares one), else its
family's (SDXL, FLUX.1: 1024)."""
from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.request import GenerationRequest
from webui.common import checkpoint_titles, error_html

log = logging.getLogger(__name__)

INSTALL_LABEL = "Install the demo model ({mb:.1f} MB toy, draws coloured shapes)"


def install_label() -> str:
    from studio.demo import demo_size_mb
    return INSTALL_LABEL.format(mb=demo_size_mb())


def demo_note(studio: Any) -> Any:
    """The note under the quicksettings row (hidden until the demo is the selected checkpoint)."""
    from studio.demo import demo_description
    return gr.Markdown(demo_description(), visible=False, elem_id="demo_model_note", elem_classes=["demo-note"])


def install(studio: Any) -> tuple[Any, str, bool]:
    """Copy the demo model into the checkpoint folder and rescan: (checkpoint update, status HTML, installed)."""
    from studio.demo import TRAINED_NAME, install_demo_model
    try:
        install_demo_model(studio.settings)
    except (OSError, StudioError) as exc:   # e.g. a read-only or full models folder
        log.exception("Installing the demo model failed")
        return gr.update(), error_html(f"Could not install the demo model into {studio.settings.ckpt_path}: "
                                       f"{exc}. Fix: make that folder writable, or start with --ckpt-dir."), False
    studio.registry.refresh()
    title = studio.registry.find_checkpoint(TRAINED_NAME).title
    return gr.update(choices=checkpoint_titles(studio), value=title), "", True


def size_pairs(ui: dict) -> list[tuple[Any, Any]]:
    """(width, height) slider pairs of every tab that has them."""
    pairs = []
    for me in ui.values():
        fields = me.get("fields") if isinstance(me, dict) else None
        if isinstance(fields, dict) and "width" in fields and "height" in fields:
            pairs.append((fields["width"], fields["height"]))
    return pairs


def native_size(studio: Any, name: str | None) -> tuple[int, int] | None:
    if not name:
        return None
    try:
        info = studio.registry.find_checkpoint(name)
    except StudioError:
        return None
    return getattr(info, "native_size", None)


def follow(studio: Any, name: str | None, previous: Any, sizes: list) -> tuple[bool, list, list]:
    """(show the demo note, the size each slider pair gets or None to keep it, the size now expected).

    A pair moves to the new model's size (its declared one, else its family's, else the default) only while it
    still holds the previous model's size or the default: a size the user chose is theirs."""
    from studio.demo import is_demo_checkpoint
    d = GenerationRequest()
    default = [d.width, d.height]
    family = studio.generation_defaults(name) if name else None
    target = [family["width"], family["height"]] if family else list(native_size(studio, name) or default)
    before = list(previous) if previous else default
    moved = [target if [int(w or 0), int(h or 0)] in (before, default) else None for w, h in sizes]
    return is_demo_checkpoint(name), moved, target


def connect(studio: Any, ui: dict, blocks_loaded: Any, note: Any, helps: list, install_buttons: list,
            install_status: list, switch: Any) -> Any:
    """Wire the note and the sliders to the checkpoint picker (and the page load), and the install buttons.

    Returns the event after the page load's sync (the layout chains its readiness marker on it)."""
    quick = ui["quick"]
    pairs = size_pairs(ui)
    expected = gr.State(None)        # the size the sliders were last moved to (this page's previous native size)
    sliders = [s for pair in pairs for s in pair]

    def sync(name, previous, *values):
        show, moved, target = follow(studio, name, previous, list(zip(values[::2], values[1::2])))
        out = [gr.update(visible=show), target]
        for size in moved:
            out += [gr.update(value=size[0]), gr.update(value=size[1])] if size else [gr.update(), gr.update()]
        return out

    hidden = dict(queue=False, api_visibility="private", show_progress="hidden")
    inputs, outputs = [quick["checkpoint"], expected, *sliders], [note, expected, *sliders]
    quick["checkpoint"].change(sync, inputs, outputs, **hidden)

    def do_install():
        update, status, ok = install(studio)
        hide = gr.update(visible=False) if ok else gr.update()
        return [update, *[hide] * len(helps), *[status] * len(install_status)]

    for button in install_buttons:
        button.click(do_install, None, [quick["checkpoint"], *helps, *install_status], **hidden).then(
            switch, quick["checkpoint"], [quick["checkpoint"], quick["status"]], concurrency_id="gpu",
            concurrency_limit=None, api_visibility="private")
    return blocks_loaded.then(sync, inputs, outputs, **hidden)
