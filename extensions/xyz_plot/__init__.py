"""X/Y/Z plot (built-in extension): a tab that makes a labelled grid over up to three parameters."""
from studio.extension_api import TabSpec, hookimpl


@hookimpl
def studio_tabs(api):
    from .ui import build  # gradio is imported only when the UI is built
    return [TabSpec("X/Y/Z plot", build, elem_id="tab_xyz_plot")]
