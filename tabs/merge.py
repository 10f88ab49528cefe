"""Merge: checkpoint merger (A1111's Checkpoint Merger + block weights) and the LoRA tools (tabs/merge_lora.py).

Every merge is a job of the studio's one queue (``studio.merge.service``), so it never runs beside a
generation; the click handler is a generator that polls the job and streams its progress. On success the
checkpoint list above the tabs is refreshed at once and "Load it" switches to the new model.
"""
from __future__ import annotations

import html
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.merge.blocks import BLOCK_IDS, parse_block_weights, presets
from studio.merge.service import field_label, submit_checkpoint_merge
from tabs import merge_lora
from webui import jobview
from webui.common import checkpoint_titles, current_checkpoint_title, error_html, note_html
from webui.icons import icon_button
from webui.model_lists import model_list, refresh_button

# label -> engine method (the engine's own table lives in a torch-importing module)
METHODS = {"Weighted sum": "weighted_sum", "Add difference": "add_difference", "No interpolation": "no_interpolation"}
METHOD_HELP = {"weighted_sum": "A × (1 − M) + B × M", "add_difference": "A + (B − C) × M",
               "no_interpolation": "A only: convert format, prune to fp16, bake a VAE"}
FORMATS = [("safetensors (single file)", "safetensors"), ("diffusers folder", "diffusers")]
HIDDEN = dict(queue=False, api_visibility="private")
CONFIG_SOURCES = [("A, B or C", 0), ("B", 1), ("C", 2), ("Don't", 3)]


def vae_names(studio: Any) -> list[str]:
    return ["None", *[v.name for v in studio.registry.vaes()]]


def build(studio: Any) -> dict:
    me: dict[str, Any] = {}
    with gr.Tabs(elem_id="merge_tabs"):
        with gr.Tab("Checkpoints", id="merge_checkpoints", elem_id="merge_tab_checkpoints"):
            me.update(_checkpoints(studio))
        with gr.Tab("LoRA", id="merge_lora", elem_id="merge_tab_lora"):
            me["lora"] = merge_lora.build(studio)
    return me


def _checkpoints(studio: Any) -> dict:
    me: dict[str, Any] = {}
    titles = checkpoint_titles(studio)
    with gr.Row(equal_height=True):
        # custom values allowed: a title gains its hash once the file is hashed, the chosen name stays valid
        for key, label in (("a", "Primary model (A)"), ("b", "Secondary model (B)"),
                           ("c", "Tertiary model (C, add difference only)")):
            me[key] = model_list(gr.Dropdown(titles, value=None, label=label, elem_id=f"merge_model_{key}", scale=3,
                                             allow_custom_value=True), "checkpoint")
        me["refresh"] = refresh_button(icon_button("Refresh", "refresh", elem_id="merge_refresh",
                                                   elem_classes=["refresh-button"], scale=0, min_width=44))
    with gr.Row():
        me["method"] = gr.Radio(list(METHODS.items()), value="weighted_sum", label="Interpolation method",
                                elem_id="merge_method", scale=2)
        me["multiplier"] = gr.Slider(0, 1, value=0.3, step=0.05, label="Multiplier (M): 0 gives model A",
                                     elem_id="merge_multiplier", scale=2)
    method_help = gr.Markdown(f"`{METHOD_HELP['weighted_sum']}`", elem_id="merge_method_help")
    _block_weights(me)
    with gr.Row():
        me["output_name"] = gr.Textbox("", label="Output name", elem_id="merge_output_name", scale=3,
                                       placeholder="empty: named after the inputs, as A1111 does")
        me["format"] = gr.Radio(FORMATS, value="safetensors", label="Format", elem_id="merge_format", scale=2)
        me["fp16"] = gr.Checkbox(False, label="Save as float16", elem_id="merge_fp16", scale=1)
    with gr.Row():
        me["vae"] = model_list(gr.Dropdown(vae_names(studio), value="None", label="Bake in VAE",
                                           elem_id="merge_bake_vae"), "bake_vae")
        me["discard"] = gr.Textbox("", label="Discard weights (regex on key names)", elem_id="merge_discard",
                                   placeholder=r"e.g. ^model_ema\.")
    with gr.Row():
        me["save_metadata"] = gr.Checkbox(True, label="Save metadata (merge recipe)", elem_id="merge_metadata")
        me["overwrite"] = gr.Checkbox(False, label="Overwrite an existing file", elem_id="merge_overwrite")
        # A1111's "Copy config from": which input's sidecar .yaml (v-prediction...) the merged file gets
        me["config_source"] = gr.Radio(CONFIG_SOURCES, value=0, label="Copy config (.yaml) from",
                                       elem_id="merge_config_source")
    with gr.Row():
        me["merge"] = gr.Button("Merge", variant="primary", elem_id="merge_run", scale=3)
        me["interrupt"] = gr.Button("Interrupt", elem_id="merge_interrupt", scale=1)
    me["progress"] = gr.HTML("", elem_id="merge_progress")
    me["error"] = gr.HTML("", elem_id="merge_error")
    me["result"] = gr.HTML("", elem_id="merge_result")
    me["load"] = gr.Button("Load it", elem_id="merge_load", visible=False, variant="secondary")
    me["new_title"] = gr.State(None)
    me["job_state"] = gr.State(None)

    me["method"].change(lambda m: f"`{METHOD_HELP.get(m, '')}`", me["method"], method_help, **HIDDEN)
    me["interrupt"].click(lambda job_id: _interrupt(studio, job_id), me["job_state"], me["progress"], **HIDDEN)
    return me


def _block_weights(me: dict) -> None:
    """25 sliders + text encoder, a preset picker and the same values as one comma-separated line."""
    table = presets()
    with gr.Accordion("Block weights (one multiplier per UNet block)", open=False, elem_id="merge_blocks"):
        with gr.Row():
            me["use_blocks"] = gr.Checkbox(False, label="Use block weights (replace M inside UNet blocks)",
                                           elem_id="merge_use_blocks")
            me["preset"] = gr.Dropdown(list(table), value=None, label="Preset", elem_id="merge_block_preset")
        me["block_text"] = gr.Textbox(_fmt([0.3] * len(BLOCK_IDS)), label="Block weights (IN00–IN11, M00, "
                                      "OUT00–OUT11)", elem_id="merge_block_weights", max_lines=1)
        sliders = {}
        with gr.Row():
            for group in (BLOCK_IDS[:12], BLOCK_IDS[12:13], BLOCK_IDS[13:]):
                with gr.Column(min_width=160):
                    for bid in group:
                        sliders[bid] = gr.Slider(0, 1, value=0.3, step=0.01, label=bid, elem_id=f"merge_block_{bid}")
                    if bid == "M00":  # the middle column has room; the text encoder belongs to no block
                        me["te"] = gr.Slider(0, 1, value=0.3, step=0.01, label="Text encoder (TE)",
                                             elem_id="merge_te_multiplier")
    me["blocks"] = sliders
    ordered = [sliders[b] for b in BLOCK_IDS]

    def from_preset(name):
        values = table.get(name)
        if values is None:
            return [gr.update()] * (len(ordered) + 2)
        return [*values, _fmt(values), True]  # choosing weights means using them

    def from_text(text):
        try:
            values = parse_block_weights(text)
        except StudioError:
            return [gr.update()] * (len(ordered) + 1)  # the Merge click reports it, naming the field
        return [*values, True]

    use = me["use_blocks"]
    me["preset"].input(from_preset, me["preset"], [*ordered, me["block_text"], use], **HIDDEN)
    me["block_text"].input(lambda: True, None, use, **HIDDEN)
    me["block_text"].blur(from_text, me["block_text"], [*ordered, use], **HIDDEN)
    me["block_text"].submit(from_text, me["block_text"], [*ordered, use], **HIDDEN)
    for s in ordered:
        s.release(lambda *v: (_fmt(v), True), ordered, [me["block_text"], use], **HIDDEN)


def _fmt(values) -> str:
    return ",".join(f"{float(v):g}" for v in values)


def retitle(studio: Any, value: str | None) -> str | None:
    """The current title of a chosen checkpoint ("name [hash]" once hashed); unknown values stay as they are."""
    if not value:
        return value
    try:
        return studio.registry.find_checkpoint(value).title
    except StudioError:
        return value


def _interrupt(studio: Any, job_id: str | None) -> None:
    job = studio.queue.get(job_id) if job_id else None
    if job is None or job.kind != "merge" or job.done:  # never stop someone's generation from here
        return gr.update()
    job.interrupt()
    return jobview.progress_html(job)     # "Interrupting…" at once, not when the current tensor is done


def _spec(a, b, c, method, multiplier, use_blocks, block_text, te, output_name, fmt, fp16, vae, discard,
          save_metadata, overwrite, config_source=0):
    from studio.merge.checkpoints import MergeSpec  # torch: only when a merge is asked for
    return MergeSpec(a=a or "", b=b or None, c=c or None, method=method, multiplier=float(multiplier),
                     block_weights=parse_block_weights(block_text) if use_blocks else None,
                     te_multiplier=float(te) if use_blocks else None, output_name=(output_name or "").strip(),
                     output_format=fmt, fp16=bool(fp16), bake_vae=None if vae in (None, "", "None") else vae,
                     discard=discard or "", save_metadata=bool(save_metadata), overwrite=bool(overwrite),
                     config_source=int(config_source))


def _check_inputs(a, b, c, method) -> None:
    if not a:
        raise StudioError("Choose the primary model.", field="model_a", fix="pick model A")
    if method != "no_interpolation" and not b:
        raise StudioError("This method needs a secondary model.", field="model_b", fix="pick model B")
    if method == "add_difference" and not c:
        raise StudioError("Add difference needs a tertiary model (A + (B − C) × M).", field="model_c",
                          fix="pick model C")


def result_html(outcome: Any, verb: str = "Saved") -> str:
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in outcome.notes)
    return (f"<div class='studio-note merge-done'>✓ {verb} <b>{html.escape(outcome.title)}</b> to "
            f"<code>{html.escape(str(outcome.path))}</code>{f'<ul>{notes}</ul>' if notes else ''}</div>")


def connect(studio: Any, ui: dict) -> None:
    """Merge and Load it: both update the checkpoint list above the tabs."""
    me, quick = ui["merge"], ui["quick"]
    pickers = [me["a"], me["b"], me["c"], *me["lora"]["checkpoint_pickers"]]
    inputs = [me[k] for k in ("a", "b", "c", "method", "multiplier", "use_blocks", "block_text", "te",
                              "output_name", "format", "fp16", "vae", "discard", "save_metadata", "overwrite",
                              "config_source")]
    outputs = [me["progress"], me["error"], me["result"], me["load"], me["new_title"], me["job_state"],
               quick["checkpoint"], *pickers]

    def run(*values):
        try:
            _check_inputs(*values[:4])
            spec = _spec(*values)
        except StudioError as exc:
            yield {me["error"]: jobview.failure_html(exc, field_label), me["result"]: "",
                   me["load"]: gr.update(visible=False)}
            return
        yield {me["error"]: "", me["result"]: "", me["load"]: gr.update(visible=False),
               me["progress"]: note_html("Queued…")}

        def done(outcome):
            titles = checkpoint_titles(studio)
            return {me["result"]: result_html(outcome), me["new_title"]: outcome.title,
                    me["load"]: gr.update(visible=True, value=f"Load it ({outcome.title})"),
                    quick["checkpoint"]: gr.update(choices=titles),
                    **{p: gr.update(choices=titles) for p in pickers[3:]},
                    **{p: gr.update(choices=titles, value=retitle(studio, v)) for p, v in zip(pickers[:3], values[:3])}}
        yield from merge_lora.follow_job(lambda: submit_checkpoint_merge(studio, spec), me, done)

    me["merge"].click(run, inputs, outputs, api_name="merge_checkpoints", show_progress="hidden",
                      concurrency_id="gpu", concurrency_limit=None)
    me["load"].click(lambda title: _load(studio, title), me["new_title"],
                     [quick["checkpoint"], quick["status"], me["error"]], show_progress="hidden",
                     concurrency_id="gpu", concurrency_limit=None, api_visibility="private")
    merge_lora.connect(studio, ui)


def _load(studio: Any, title: str | None) -> tuple:
    """Make the merged model current (through the queue, between jobs), like picking it in the list."""
    if not title:
        return gr.update(), "", ""
    try:
        loaded = studio.switch_checkpoint(title)
    except Exception as exc:  # noqa: BLE001 - a model that does not load must not take the page down
        message = str(exc) if isinstance(exc, StudioError) else f"Could not load {title!r}: {exc}"
        return gr.update(value=current_checkpoint_title(studio)), "", error_html(message)
    return gr.update(choices=checkpoint_titles(studio), value=loaded), note_html(f"Loaded {loaded}"), ""
