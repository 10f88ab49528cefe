"""Tabs added by extensions (``studio_tabs``): each ``TabSpec.build(api)`` runs inside its own ``gr.Tab``.

A build that raises is recorded on the extension (the Extensions tab shows it with its traceback) and its tab
shows an error box instead; the rest of the UI still loads.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import gradio as gr

from webui.common import error_html

log = logging.getLogger(__name__)


def build_extension_tabs(studio: Any) -> list[str]:
    """Call inside ``gr.Tabs``, after the built-in tabs. Returns the elem_ids of the tabs made."""
    manager = getattr(studio, "extensions", None)
    if manager is None:
        return []
    made = []
    for name, spec in manager.collect("studio_tabs"):
        title = str(getattr(spec, "title", "") or name)
        elem_id = getattr(spec, "elem_id", "") or "tab_ext_" + re.sub(r"\W+", "_", title.lower()).strip("_")
        with gr.Tab(title, elem_id=elem_id):
            try:
                with gr.Column():  # a half-built tab stays inside this column, above the error box
                    spec.build(manager.api(name))
            except Exception as exc:  # noqa: BLE001 - an extension's UI must not take the page down
                manager.record_error(name, "studio_tabs (building the tab)", exc)
                log.exception("Extension %s: building tab %r failed", name, title)
                gr.HTML(error_html(f"Extension '{name}' could not build this tab: {type(exc).__name__}: {exc}. "
                                   "Details are on the Extensions tab."))
        made.append(elem_id)
    return made
