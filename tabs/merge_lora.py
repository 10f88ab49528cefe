"""The Merge tab's LoRA tools: bake LoRAs into a checkpoint, merge LoRAs, resize one, extract one from two models.

Each tool is a job of the studio's queue (``studio.merge.service.submit_lora``); its handler streams progress.
New LoRAs are in the extra-networks list (and this tab's pickers) at once; a baked checkpoint in the checkpoint
lists. LoRA lists are plain text, one ``name:weight`` (or ``name:te:unet``) per line, so they can be pasted.
"""
from __future__ import annotations

import html
import re
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.merge.service import field_label, submit_lora
from webui import jobview
from webui.common import checkpoint_titles, note_html
from webui.model_lists import model_list

HIDDEN = dict(queue=False, api_visibility="private")
RESIZE_METHODS = [("Fixed rank", "fixed"), ("Singular-value ratio (sv_ratio)", "sv_ratio"),
                  ("Frobenius share (sv_fro)", "sv_fro"), ("Cumulative share (sv_cumulative)", "sv_cumulative")]
_PROMPT_TAG = re.compile(r"^<(?:lora|lyco):(.*)>$", re.IGNORECASE)
MAX_TABLE_ROWS = 400


def lora_names(studio: Any) -> list[str]:
    return sorted(e.name for e in studio.loras.entries())


def parse_lora_list(text: str) -> list[tuple]:
    """Lines of ``name``, ``name:weight``, ``name:te:unet`` or ``<lora:name:weight>`` -> engine entries."""
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := _PROMPT_TAG.match(line):
            line = m.group(1)
        name, *weights = [p.strip() for p in line.split(":")]
        try:
            values = [float(w) for w in weights] or [1.0]
        except ValueError:
            raise StudioError(f"{line!r}: the weights after the name must be numbers.", field="loras",
                              fix="write one LoRA per line as name:weight (e.g. myLora:0.8)") from None
        if not name or len(values) > 2:
            raise StudioError(f"{line!r} is not name:weight or name:te_weight:unet_weight.", field="loras")
        out.append((name, *values))
    if not out:
        raise StudioError("The LoRA list is empty.", field="loras", fix="add LoRAs with the picker above the list")
    return out


def _lora_list(prefix: str, studio: Any, t: dict) -> None:
    t["add"] = model_list(gr.Dropdown(lora_names(studio), value=None, label="Add a LoRA", elem_id=f"{prefix}_add"),
                          "lora")
    t["list"] = gr.Textbox("", lines=4, label="LoRAs (one per line: name:weight or name:te_weight:unet_weight)",
                           elem_id=f"{prefix}_list", placeholder="myLora:0.8\notherLora:0.5")

    def add(name, text):
        if not name:
            return gr.update(), text
        return gr.update(value=None), (text.rstrip() + "\n" if text.strip() else "") + f"{name}:1.0"
    t["add"].input(add, [t["add"], t["list"]], [t["add"], t["list"]], **HIDDEN)


def _output_row(prefix: str, t: dict, *, fp16: bool, metadata: bool = False) -> None:
    with gr.Row():
        t["output_name"] = gr.Textbox("", label="Output name", elem_id=f"{prefix}_output_name", scale=3)
        t["fp16"] = gr.Checkbox(fp16, label="Save as float16", elem_id=f"{prefix}_fp16", scale=1)
        if metadata:
            t["save_metadata"] = gr.Checkbox(True, label="Save metadata", elem_id=f"{prefix}_metadata", scale=1)
        t["overwrite"] = gr.Checkbox(False, label="Overwrite", elem_id=f"{prefix}_overwrite", scale=1)
    with gr.Row():
        t["run"] = gr.Button(t.pop("verb"), variant="primary", elem_id=f"{prefix}_run", scale=3)
        t["interrupt"] = gr.Button("Interrupt", elem_id=f"{prefix}_interrupt", scale=1)
    t["progress"] = gr.HTML("", elem_id=f"{prefix}_progress")
    t["error"] = gr.HTML("", elem_id=f"{prefix}_error")
    t["result"] = gr.HTML("", elem_id=f"{prefix}_result")
    t["job_state"] = gr.State(None)


def _rank_sliders(prefix: str, t: dict, rank: int, conv_label: str) -> None:
    with gr.Row():
        t["rank"] = gr.Slider(1, 320, value=rank, step=1, label="Rank", elem_id=f"{prefix}_rank")
        t["conv_rank"] = gr.Slider(0, 320, value=0, step=1, label=conv_label, elem_id=f"{prefix}_conv_rank")


def build(studio: Any) -> dict:
    titles = checkpoint_titles(studio)
    tools: dict[str, dict] = {}
    with gr.Tabs(elem_id="merge_lora_tools"):
        with gr.Tab("Bake into checkpoint", id="bake", elem_id="merge_lora_tab_bake"):
            t = tools["bake"] = {"verb": "Bake"}
            t["checkpoint"] = model_list(gr.Dropdown(titles, value=None, label="Checkpoint",
                                                     elem_id="merge_bake_checkpoint", allow_custom_value=True),
                                         "checkpoint")
            _lora_list("merge_bake", studio, t)
            _output_row("merge_bake", t, fp16=False, metadata=True)
        with gr.Tab("Merge LoRAs", id="merge", elem_id="merge_lora_tab_merge"):
            t = tools["merge"] = {"verb": "Merge LoRAs"}
            _lora_list("merge_loras", studio, t)
            t["mode"] = gr.Radio([("Exact (concatenate ranks)", "concat"), ("SVD to a target rank", "svd")],
                                 value="concat", label="Mode", elem_id="merge_loras_mode")
            _rank_sliders("merge_loras", t, 32, "Conv rank (SVD; 0: same as rank)")
            _output_row("merge_loras", t, fp16=True)
        with gr.Tab("Resize", id="resize", elem_id="merge_lora_tab_resize"):
            t = tools["resize"] = {"verb": "Resize"}
            t["lora"] = model_list(gr.Dropdown(lora_names(studio), value=None, label="LoRA",
                                               elem_id="merge_resize_lora"), "lora")
            t["method"] = gr.Radio(RESIZE_METHODS, value="fixed", label="New rank by", elem_id="merge_resize_method")
            _rank_sliders("merge_resize", t, 16, "Conv rank (0: same as rank)")
            t["param"] = gr.Number(0.9, label="Parameter (ratio ≥ 1 for sv_ratio, share 0–1 for sv_fro / "
                                   "sv_cumulative); rank is then the cap", elem_id="merge_resize_param",
                                   visible=False)
            t["method"].change(lambda m: gr.update(visible=m != "fixed"), t["method"], t["param"], **HIDDEN)
            _output_row("merge_resize", t, fp16=True)
        with gr.Tab("Extract", id="extract", elem_id="merge_lora_tab_extract"):
            t = tools["extract"] = {"verb": "Extract"}
            with gr.Row():
                t["tuned"] = model_list(gr.Dropdown(titles, value=None, label="Tuned model",
                                                    elem_id="merge_extract_tuned", allow_custom_value=True),
                                        "checkpoint")
                t["base"] = model_list(gr.Dropdown(titles, value=None, label="Base model",
                                                   elem_id="merge_extract_base", allow_custom_value=True),
                                       "checkpoint")
            _rank_sliders("merge_extract", t, 32, "Conv rank (3×3 convs; 0: none)")
            with gr.Row():
                t["clamp"] = gr.Slider(0.5, 1, value=0.99, step=0.001, label="Clamp quantile (1: no clamp)",
                                       elem_id="merge_extract_clamp")
                t["min_diff"] = gr.Number(0.01, label="Keep the text encoder if it differs by more than",
                                          elem_id="merge_extract_min_diff")
            _output_row("merge_extract", t, fp16=True)
    for t in tools.values():
        t["interrupt"].click(lambda job_id: _interrupt(studio, job_id), t["job_state"], t["progress"], **HIDDEN)
    return {"tools": tools, "checkpoint_pickers": [tools["bake"]["checkpoint"], tools["extract"]["tuned"],
                                                   tools["extract"]["base"]],
            "lora_pickers": [tools["bake"]["add"], tools["merge"]["add"], tools["resize"]["lora"]]}


def _interrupt(studio: Any, job_id: str | None) -> Any:
    job = studio.queue.get(job_id) if job_id else None
    if job is None or job.kind != "merge" or job.done:
        return gr.update()
    job.interrupt()
    return jobview.progress_html(job)     # "Interrupting…" at once


def _int(v) -> int:
    return int(round(float(v or 0)))


def _kwargs(action: str, v: dict) -> dict:
    """Widget values -> submit_lora keyword arguments (sliders send floats)."""
    common = dict(output_name=(v["output_name"] or "").strip(), fp16=bool(v["fp16"]), overwrite=bool(v["overwrite"]))
    if not common["output_name"]:
        raise StudioError("Give the new file a name.", field="output_name", fix="type an output name")
    if action == "bake":
        if not v["checkpoint"]:
            raise StudioError("Choose the checkpoint to bake into.", field="checkpoint")
        return dict(checkpoint=v["checkpoint"], loras=parse_lora_list(v["list"]),
                    save_metadata=bool(v["save_metadata"]), **common)
    if action == "merge":
        return dict(loras=parse_lora_list(v["list"]), mode=v["mode"], rank=_int(v["rank"]),
                    conv_rank=_int(v["conv_rank"]) or None, **common)
    if action == "resize":
        if not v["lora"]:
            raise StudioError("Choose the LoRA to resize.", field="lora")
        method = v["method"]
        return dict(lora=v["lora"], method=method, rank=_int(v["rank"]), conv_rank=_int(v["conv_rank"]) or None,
                    param=None if method == "fixed" else float(v["param"] or 0), **common)
    if not v["tuned"] or not v["base"]:
        raise StudioError("Choose the tuned model and its base model.", field="tuned" if not v["tuned"] else "base")
    clamp = float(v["clamp"])
    return dict(tuned=v["tuned"], base=v["base"], rank=_int(v["rank"]), conv_rank=_int(v["conv_rank"]),
                clamp_quantile=None if clamp >= 1 else clamp, min_diff=float(v["min_diff"] or 0), **common)


def report_html(outcome: Any) -> str:
    """Saved path, notes, and for LoRA outputs the kept energy overall and per layer (a scrollable table)."""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in outcome.notes)
    head = (f"<div class='studio-note merge-done'>✓ Saved <b>{html.escape(outcome.title)}</b> to "
            f"<code>{html.escape(str(outcome.path))}</code>{f'<ul>{notes}</ul>' if notes else ''}</div>")
    if not outcome.layers:
        return head
    ranks = sorted({s.new_rank for s in outcome.layers.values()})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    overall = (f"<p class='merge-energy'>Kept energy overall: <b>{outcome.energy * 100:.2f} %</b> · "
               f"{len(outcome.layers)} layers · rank {rank_text}</p>")
    rows = "".join(f"<tr><td>{html.escape(stem)}</td><td>{s.old_rank if s.old_rank is not None else '–'}</td>"
                   f"<td>{s.new_rank}</td><td>{s.energy * 100:.2f} %</td></tr>"
                   for stem, s in list(outcome.layers.items())[:MAX_TABLE_ROWS])
    more = len(outcome.layers) - MAX_TABLE_ROWS
    tail = f"<p class='studio-note'>… and {more} more layers</p>" if more > 0 else ""
    return (f"{head}{overall}<div class='merge-layers' style='max-height:360px;overflow:auto'>"
            "<table class='studio-params'><thead><tr><th>Layer</th><th>Old rank</th><th>New rank</th>"
            f"<th>Kept energy</th></tr></thead><tbody>{rows}</tbody></table></div>{tail}")


def connect(studio: Any, ui: dict) -> None:
    """Run buttons; outputs reach the checkpoint lists (bake) and every LoRA picker (the rest)."""
    me, quick, merge = ui["merge"]["lora"], ui["quick"], ui["merge"]
    ckpt_lists = [quick["checkpoint"], merge["a"], merge["b"], merge["c"], *me["checkpoint_pickers"]]
    for action, t in me["tools"].items():
        names = [k for k in ("checkpoint", "list", "mode", "rank", "conv_rank", "lora", "method", "param", "tuned",
                             "base", "clamp", "min_diff", "output_name", "fp16", "save_metadata", "overwrite")
                 if k in t]
        targets = ckpt_lists if action == "bake" else me["lora_pickers"]
        outputs = [t["progress"], t["error"], t["result"], t["job_state"], *targets]
        t["run"].click(_runner(studio, action, t, names, targets), [t[k] for k in names], outputs,
                       api_name=f"merge_lora_{action}", show_progress="hidden", concurrency_id="gpu",
                       concurrency_limit=None)


def _runner(studio: Any, action: str, t: dict, names: list[str], targets: list):
    def run(*values):
        try:
            kw = _kwargs(action, dict(zip(names, values)))
        except StudioError as exc:
            yield {t["error"]: jobview.failure_html(exc, field_label), t["result"]: ""}
            return
        yield {t["error"]: "", t["result"]: "", t["progress"]: note_html("Queued…")}

        def done(outcome):
            fresh = checkpoint_titles(studio) if action == "bake" else lora_names(studio)
            return {t["result"]: report_html(outcome), **{p: gr.update(choices=fresh) for p in targets}}
        yield from follow_job(lambda: submit_lora(studio, action, **kw), t, done)
    return run


def follow_job(submit, w: dict, done):
    """Updates for a queued merge job: the progress bar while it runs, then its error, "Interrupted", or
    ``done(outcome)``. ``w`` holds the page's progress / job_state / error / result components."""
    for bar, outcome, error, job in jobview.follow(submit):
        if bar:
            yield {w["progress"]: bar, w["job_state"]: job.id}
            continue
        end = {w["progress"]: "", w["job_state"]: None}
        if error is not None:
            yield {**end, w["error"]: jobview.failure_html(error, field_label)}
        elif outcome is None:
            yield {**end, w["result"]: note_html("Interrupted: nothing was written.")}
        else:
            yield {**end, **done(outcome)}
