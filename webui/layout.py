"""The page: the quicksettings row (checkpoint + VAE) above all tabs, then the tabs from ``tabs.TABS``."""
from __future__ import annotations

import logging
from typing import Any

import gradio as gr

import tabs
from studio.errors import StudioError
from webui import demo_ui, family_defaults, sendto
from webui.extension_tabs import build_extension_tabs
from webui.icons import TITLES_JS, icon_button, icons_css
from webui.model_lists import ModelLists, model_list, refresh_button
from webui.common import (NO_CHECKPOINT_HELP, checkpoint_titles, current_checkpoint_title, error_html, note_html,
                          vae_choices)

log = logging.getLogger(__name__)

CSS = """
#quicksettings { align-items: end; gap: 8px; }
#quicksettings .refresh-button { max-width: 44px; min-width: 44px; height: 40px; }
/* the status after a checkpoint switch fills its column at the row's height and scrolls inside it: a long error
   (also shown as a toast) must not make the row taller and push every tab down */
#quicksettings_status { align-self: stretch; position: relative; min-height: 0; padding: 0; }
#quicksettings_status .studio-error, #quicksettings_status .studio-note { position: absolute; inset: 0;
    overflow-y: auto; overflow-wrap: anywhere; margin: 0; font-size: 0.85em; }
/* toasts float over everything, the positioned status box included */
.toast-wrap { z-index: 1000 !important; }
/* token counters sit over the top-right corner of their prompt box, as in A1111 */
.token-box { margin-bottom: calc(-1 * var(--layout-gap) - 22px);
    z-index: 5; text-align: right; padding-right: 12px; pointer-events: none; }
.token-counter { font-size: 0.8em; opacity: 0.75; }
.token-counter-over { color: #d97706; opacity: 1; }
.studio-error { border: 1px solid #dc2626; background: #fef2f2; color: #991b1b; padding: 8px 12px;
                border-radius: 6px; }
.studio-note { opacity: 0.85; font-size: 0.9em; margin: 4px 0; }
.studio-progress { position: relative; height: 26px; border-radius: 6px; background: var(--block-background-fill);
                   border: 1px solid var(--border-color-primary); overflow: hidden; }
.studio-progress-bar { position: absolute; top: 0; bottom: 0; left: 0; background: #f97316; opacity: 0.55;
                       transition: width 0.2s; }
.studio-progress-text { position: relative; padding-left: 8px; line-height: 26px; font-size: 0.9em; }
.studio-infotext { font-size: 0.9em; word-break: break-word; }
.studio-params th { text-align: left; padding-right: 12px; vertical-align: top; white-space: nowrap; }
.send-row { gap: 6px; flex-wrap: wrap; }
/* ControlNet unit: Preview and refresh sit at the bottom of the dropdowns' row instead of stretching to its height */
.cn-tools { align-items: end; }
.demo-note, .no-checkpoint { border-left: 4px solid #f59e0b; padding-left: 10px; }
.no-checkpoint .install-demo { max-width: 420px; }
#demo_model_note { font-size: 0.9em; }
#demo_model_note ul { margin: 2px 0; }
""" + icons_css()

# Browser tests (and humans with a slow machine) wait for this marker: the load chain has finished.
READY_JS = "() => { " + TITLES_JS + " document.body.dataset.appReady = '1'; }"


def build_blocks(studio: Any) -> gr.Blocks:
    """The whole UI. Tab modules are imported here, so a broken tab fails at start with its name."""
    specs = [(spec, tabs.load(spec)) for spec in tabs.TABS]
    ui: dict[str, Any] = {}
    with gr.Blocks(title="Studio", analytics_enabled=False) as blocks:
        ui["quick"] = quick = _quicksettings(studio)
        note = demo_ui.demo_note(studio)
        helps, installs, statuses = [], [], []
        with gr.Tabs(elem_id="tabs") as tab_bar:
            for spec, module in specs:
                with gr.Tab(spec.label, id=spec.id, elem_id=f"tab_{spec.id}"):
                    with gr.Column(visible=not _has_checkpoints(studio), elem_classes=["no-checkpoint"]) as help_box:
                        gr.Markdown(_help_text(studio))
                        installs.append(gr.Button(demo_ui.install_label(), variant="primary", size="sm",
                                                  elem_id=f"{spec.id}_install_demo",
                                                  elem_classes=["install-demo"]))
                        statuses.append(gr.HTML(""))
                    helps.append(help_box)
                    ui[spec.id] = module.build(studio)
            ui["extension_tabs"] = build_extension_tabs(studio)
        ui["tabs"] = tab_bar
        for _, module in specs:
            if hasattr(module, "connect"):
                module.connect(studio, ui)
        sendto.connect(studio, ui)

        quick["checkpoint"].input(lambda name: _switch(studio, name), quick["checkpoint"],
                                  [quick["checkpoint"], quick["status"]], concurrency_id="gpu",
                                  concurrency_limit=None, api_name="switch_checkpoint")
        # every model list of the page is refreshed together: by any 🔄, on every tab select and on page load
        # (another page, a training or a merge may have added a model; a file may have been dropped in)
        every_tab = [b for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
        lists = ModelLists.collect(studio, blocks)
        loaded = lists.connect(blocks, every_tab, extra=(helps, lambda: _help_updates(studio)))
        synced = demo_ui.connect(studio, ui, loaded, note, helps, installs, statuses,
                                 lambda name: _switch(studio, name))
        synced = family_defaults.connect(studio, ui, synced)
        synced.then(None, None, None, js=READY_JS, queue=False, api_visibility="private")
    return blocks


def _quicksettings(studio: Any) -> dict:
    with gr.Row(elem_id="quicksettings"):
        checkpoint = model_list(gr.Dropdown(checkpoint_titles(studio), value=current_checkpoint_title(studio),
                                            label="Stable Diffusion checkpoint", elem_id="setting_sd_model_checkpoint",
                                            allow_custom_value=True, scale=4, min_width=300), "checkpoint",
                                current=True)
        refresh = refresh_button(icon_button("Refresh the model lists", "refresh", elem_id="refresh_sd_model_checkpoint",
                                             elem_classes=["refresh-button"], scale=0, min_width=44))
        vae = model_list(gr.Dropdown(vae_choices(studio), value=studio.settings.default_vae or "Automatic",
                                     label="SD VAE", elem_id="setting_sd_vae", allow_custom_value=True, scale=2,
                                     min_width=200), "vae")
        status = gr.HTML("", elem_id="quicksettings_status")
    return {"checkpoint": checkpoint, "refresh": refresh, "vae": vae, "status": status}


def _has_checkpoints(studio: Any) -> bool:
    return bool(studio.registry.checkpoints())


def _help_text(studio: Any) -> str:
    return NO_CHECKPOINT_HELP.format(ckpt_dir=studio.settings.ckpt_path.resolve())


def _help_updates(studio: Any) -> list:
    return [gr.update(visible=not _has_checkpoints(studio))] * len(tabs.TABS)


def _switch(studio: Any, name: str) -> tuple:
    """Load the chosen checkpoint now (through the engine's queue, between jobs) so the first Generate is quick."""
    if not name:
        return gr.update(), ""
    current = getattr(studio.manager, "current", None)
    if current is not None and name in (current.title, current.name):
        # re-picking the loaded model (a dropdown's blur sends its value again) must not queue a switch: one
        # queued behind a newer switch ("Load it" on the Merge tab) would undo it
        return gr.update(), ""
    try:
        title = studio.switch_checkpoint(name)
    except StudioError as exc:
        gr.Warning(str(exc))
        return gr.update(value=current_checkpoint_title(studio)), error_html(str(exc))
    except Exception as exc:  # noqa: BLE001 - a bad file must not take the page down
        log.exception("Loading checkpoint %r failed", name)
        message = f"Could not load {name!r}: {type(exc).__name__}: {exc}"
        gr.Warning(message)
        return gr.update(value=current_checkpoint_title(studio)), error_html(message)
    return gr.update(choices=checkpoint_titles(studio), value=title), note_html(f"Loaded {title}")
