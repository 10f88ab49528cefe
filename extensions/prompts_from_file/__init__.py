"""Prompts from file or textbox (built-in extension): one generation per line."""
from studio.extension_api import TabSpec, hookimpl


@hookimpl
def studio_tabs(api):
    from .ui import build  # gradio is imported only when the UI is built
    return [TabSpec("Prompts from file", build, elem_id="tab_prompts_from_file")]
