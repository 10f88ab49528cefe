"""Extensions: what is installed (status, errors with tracebacks, folder), enable / disable, install from a
local folder or a zip (offline), and the settings extensions add (``studio_settings``).

Extensions are imported once, at start: enabling, disabling or installing one takes effect after a restart.
"""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from studio.errors import StudioError
from webui.common import error_html, note_html
from webui.icons import icon_button

RESTART_NOTE = ("Enabling or disabling an extension is saved at once and **takes effect after a UI reload / "
                "restart** of the studio (extensions are imported once, when it starts). New installs too.")


def build(studio: Any) -> dict:
    manager = studio.extensions
    gr.Markdown(RESTART_NOTE, elem_id="extensions_note")
    # a callable value is re-read on every page load: errors of extension tabs built after this one show up
    table = gr.HTML(lambda: render_table(manager), elem_id="extensions_table")
    refresh = icon_button("Refresh list", "refresh", text=True, elem_id="extensions_refresh", scale=0, min_width=160)
    enabled = gr.CheckboxGroup(_names(manager), value=_enabled(manager), elem_id="extensions_enabled",
                               label="Enabled extensions (takes effect after a UI reload / restart)")
    enabled_msg = gr.HTML("", elem_id="extensions_enabled_message")
    with gr.Accordion("Install an extension (offline)", open=False):
        with gr.Row():
            folder = gr.Textbox(label="Local folder (a path on the machine running the studio)", lines=1,
                                max_lines=1, elem_id="extensions_install_path", scale=4)
            install_folder = gr.Button("Install from folder", elem_id="extensions_install_folder", scale=1)
        with gr.Row():
            upload = gr.File(label="…or a .zip of the extension", file_types=[".zip"], type="filepath",
                             elem_id="extensions_install_zip", scale=4)
            install_zip = gr.Button("Install zip", elem_id="extensions_install_zip_button", scale=1)
        install_msg = gr.HTML("", elem_id="extensions_install_message")
    settings = _settings_block(studio)

    def relist() -> tuple:
        return render_table(manager), gr.update(choices=_names(manager), value=_enabled(manager))

    refresh.click(relist, None, [table, enabled], queue=False, api_visibility="private")
    enabled.input(lambda names: _set_enabled(manager, names), enabled, [enabled_msg, table], queue=False,
                  api_visibility="private")
    for button, box, method in ((install_folder, folder, manager.install_from_folder),
                                (install_zip, upload, manager.install_from_zip)):
        button.click(lambda value, fn=method: (_install(fn, value), *relist()), box, [install_msg, table, enabled],
                     queue=False, api_visibility="private")
    return {"table": table, "enabled": enabled, "install_message": install_msg, **settings}


def render_table(manager: Any) -> str:
    rows = []
    for ext in manager.listing():
        status = ext.status
        if ext.status == "loaded" and not ext.enabled:
            status = "loaded (disabled at the next start)"
        elif ext.status == "disabled" and ext.enabled:
            status = "disabled (enabled at the next start)"
        errors = ""
        if ext.errors:
            errors = (f"<details><summary>{len(ext.errors)} error(s)</summary>"
                      + "".join(f"<pre class='ext-traceback'>{html.escape(e)}</pre>" for e in ext.errors)
                      + "</details>")
        path = ext.path.resolve()
        rows.append(
            f"<tr data-extension='{html.escape(ext.name)}'><td><b>{html.escape(ext.name)}</b></td>"
            f"<td>{html.escape(ext.version)}</td><td>{html.escape(ext.description)}</td>"
            f"<td class='ext-status ext-status-{html.escape(ext.status.split()[0])}'>{html.escape(status)}</td>"
            f"<td><a href='{html.escape(path.as_uri())}' target='_blank' title='open its folder'>"
            f"<code>{html.escape(str(path))}</code></a></td><td>{errors}</td></tr>")
    if not rows:
        roots = ", ".join(str(r.resolve()) for r in manager.roots)
        return note_html(f"No extensions installed. Put extension folders into {roots}.")
    return ("<table class='studio-params' id='extensions_list'><thead><tr><th>Extension</th><th>Version</th>"
            "<th>Description</th><th>Status</th><th>Folder</th><th>Errors</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _names(manager: Any) -> list[str]:
    return [e.name for e in manager.listing()]


def _enabled(manager: Any) -> list[str]:
    return [e.name for e in manager.listing() if e.enabled]


def _set_enabled(manager: Any, names: list[str]) -> tuple[str, str]:
    wanted = set(names or [])
    changed = []
    for ext in manager.listing():
        if (ext.name in wanted) != ext.enabled:
            manager.set_enabled(ext.name, ext.name in wanted)
            changed.append(f"{ext.name} {'enabled' if ext.name in wanted else 'disabled'}")
    text = ("Saved: " + ", ".join(changed) + ". Takes effect after a UI reload / restart of the studio."
            if changed else "Nothing changed.")
    return note_html(text), render_table(manager)


def _install(method: Any, value: Any) -> str:
    if not value:
        return error_html("Give a folder path or choose a .zip file first.")
    try:
        ext = method(value)
    except StudioError as exc:
        return error_html(f"Not installed: {exc}")
    except OSError as exc:
        return error_html(f"Not installed: {exc}")
    return note_html(f"Installed {ext.name} {ext.version} into {ext.path}. Restart the studio to load it.")


# ---- settings added by extensions ------------------------------------------------------------------------
def _settings_block(studio: Any) -> dict:
    manager = studio.extensions
    specs = manager.setting_specs()
    if not specs:
        return {}
    widgets = []
    with gr.Accordion("Extension settings", open=True, elem_id="extensions_settings"):
        for ext_name in dict.fromkeys(name for name, _ in specs):
            gr.Markdown(f"**{ext_name}**")
            with gr.Row():
                for name, spec in specs:
                    if name == ext_name:
                        widgets.append(_setting_widget(spec, manager.api(name).setting(spec.key, spec.default)))
        with gr.Row():
            save = gr.Button("Save extension settings", elem_id="extensions_settings_save", scale=0, min_width=220)
            message = gr.HTML("", elem_id="extensions_settings_message")
    save.click(lambda *values: _save_settings(manager, [s for _, s in specs], values), widgets, message,
               queue=False, api_visibility="private")
    return {"settings": widgets, "settings_save": save, "settings_message": message}


def _setting_widget(spec: Any, value: Any) -> Any:
    label, elem_id = spec.label or spec.key, f"extsetting_{spec.key}"
    if isinstance(spec.default, bool):
        return gr.Checkbox(value=bool(value), label=label, elem_id=elem_id)
    if isinstance(spec.default, (int, float)):
        return gr.Number(value=value, label=label, elem_id=elem_id,
                         precision=0 if isinstance(spec.default, int) else None)
    return gr.Textbox(value="" if value is None else str(value), label=label, elem_id=elem_id, lines=1, max_lines=1)


def coerce_setting(spec: Any, value: Any) -> Any:
    """A widget value in the type of the setting's default (Number gives floats, Textbox strings)."""
    default = spec.default
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        if value is None or float(value) != int(float(value)):
            raise StudioError(f"Setting '{spec.label or spec.key}' must be a whole number, got {value!r}.")
        return int(float(value))
    if isinstance(default, float):
        return float(value if value is not None else default)
    return "" if value is None else str(value)


def _save_settings(manager: Any, specs: list, values: tuple) -> str:
    try:
        changes = {spec.key: coerce_setting(spec, v) for spec, v in zip(specs, values)}
        path = manager.save_settings(changes)
    except (StudioError, OSError, ValueError) as exc:
        return error_html(f"Not saved: {exc}")
    return note_html(f"Saved to {path}; extensions read the new values at once.")
