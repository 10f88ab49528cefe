"""txt2img: prompt boxes, generation parameters, live progress and the result gallery.

Generate goes through ``studio.submit`` (the engine's single FIFO queue shared with the REST API), then a
generator polls the Job for progress and previews. Interrupt / Skip act on this page's job at once
(``queue=False``); with no job of its own the page stops the running job, as A1111 does.
"""
from __future__ import annotations

import html
import inspect
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.request import GenerationRequest
from studio.samplers import SAMPLERS, SCHEDULE_TYPES
from webui.common import DEMO_NOTE, TokenCounter, error_html, is_demo_model, note_html

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
# the request fields this tab edits, by GenerationRequest name (values are mapped by name, never by position)
FIELDS = ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height",
          "n_iter", "batch_size", "seed", "subseed", "subseed_strength", "clip_skip")
INT_FIELDS = {"steps", "width", "height", "n_iter", "batch_size", "seed", "subseed", "clip_skip"}


def build(studio: Any) -> dict:
    """Lay out the tab; events that need the quicksettings are wired in :func:`connect`."""
    s, d = studio.settings, GenerationRequest()
    counter = TokenCounter(studio)
    f: dict[str, Any] = {}
    with gr.Row(elem_id="txt2img_toprow"):
        with gr.Column(scale=6):
            prompt_tokens = gr.HTML(counter.html(""), elem_id="txt2img_token_counter")
            f["prompt"] = gr.Textbox("", label="Prompt", lines=3, elem_id="txt2img_prompt",
                                     placeholder="Prompt (A1111 syntax: (word:1.2), [word], BREAK, <lora:name:1>)")
            neg_tokens = gr.HTML(counter.html(""), elem_id="txt2img_neg_token_counter")
            f["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=2, elem_id="txt2img_neg_prompt")
        with gr.Column(scale=1, min_width=200):
            generate = gr.Button("Generate", variant="primary", elem_id="txt2img_generate", size="lg")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id="txt2img_interrupt", size="sm")
                skip = gr.Button("Skip", elem_id="txt2img_skip", size="sm")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            with gr.Row():
                f["sampler_name"] = gr.Dropdown(list(SAMPLERS), value=d.sampler_name, label="Sampling method",
                                                elem_id="txt2img_sampling")
                f["scheduler"] = gr.Dropdown(list(SCHEDULE_TYPES), value=d.scheduler, label="Schedule type",
                                             elem_id="txt2img_scheduler")
            f["steps"] = gr.Slider(1, s.max_steps, value=d.steps, step=1, label="Sampling steps",
                                   elem_id="txt2img_steps")
            with gr.Row():
                with gr.Column(scale=5, min_width=200):
                    f["width"] = gr.Slider(64, s.max_width, value=d.width, step=8, label="Width",
                                           elem_id="txt2img_width")
                    f["height"] = gr.Slider(64, s.max_height, value=d.height, step=8, label="Height",
                                            elem_id="txt2img_height")
                swap = gr.Button("⇅", elem_id="txt2img_swap", scale=0, min_width=48, size="sm")
            with gr.Row():
                f["n_iter"] = gr.Slider(1, s.max_batch_count, value=d.n_iter, step=1, label="Batch count",
                                        elem_id="txt2img_batch_count")
                f["batch_size"] = gr.Slider(1, s.max_batch_size, value=d.batch_size, step=1, label="Batch size",
                                            elem_id="txt2img_batch_size")
            f["cfg_scale"] = gr.Slider(1, 30, value=d.cfg_scale, step=0.5, label="CFG Scale", elem_id="txt2img_cfg")
            with gr.Row():
                f["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="txt2img_seed",
                                      scale=5)
                random_seed = gr.Button("🎲", elem_id="txt2img_random_seed", scale=0, min_width=48, size="sm")
                reuse_seed = gr.Button("♻️", elem_id="txt2img_reuse_seed", scale=0, min_width=48, size="sm")
            with gr.Accordion("Variation seed", open=False, elem_id="txt2img_variation"):
                with gr.Row():
                    f["subseed"] = gr.Number(value=-1, precision=0, label="Variation seed", elem_id="txt2img_subseed")
                    f["subseed_strength"] = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                                      elem_id="txt2img_subseed_strength")
            f["clip_skip"] = gr.Slider(1, 12, value=d.clip_skip, step=1, label="Clip skip",
                                       elem_id="txt2img_clip_skip")
        with gr.Column(scale=1):
            progress = gr.HTML("", elem_id="txt2img_progress")
            preview = gr.Image(label="Live preview", visible=False, format="png", interactive=False,
                               elem_id="txt2img_preview", height=256)
            error = gr.HTML("", elem_id="txt2img_error")
            demo_note = gr.Markdown(DEMO_NOTE, visible=False, elem_id="txt2img_demo_note")
            gallery = gr.Gallery(label="Output", format="png", columns=4, height="auto", interactive=False,
                                 elem_id="txt2img_gallery", object_fit="contain")
            with gr.Row():
                open_folder = gr.Button("📂 Open outputs folder", elem_id="txt2img_open_folder", size="sm",
                                        scale=0, min_width=200)
                folder_note = gr.Markdown(f"Saved to `{_outputs_folder(studio)}`", elem_id="txt2img_folder")
            info = gr.HTML("", elem_id="txt2img_info")
    job_state = gr.State(None)          # this page's job id, so Interrupt/Skip act on its own job
    results = gr.State({"seeds": [], "infotexts": [], "selected": 0})

    prompt_counter = dict(queue=False, show_progress="hidden", api_visibility="private", trigger_mode="always_last")
    f["prompt"].change(counter.html, f["prompt"], prompt_tokens, **prompt_counter)
    f["negative_prompt"].change(counter.html, f["negative_prompt"], neg_tokens, **prompt_counter)
    swap.click(lambda w, h: (h, w), [f["width"], f["height"]], [f["width"], f["height"]], queue=False,
               api_visibility="private")
    random_seed.click(lambda: -1, None, f["seed"], queue=False, api_visibility="private")
    reuse_seed.click(_reuse_seed, [results, f["seed"]], f["seed"], queue=False, api_visibility="private")
    gallery.select(_select_image, results, [results, info], queue=False, api_visibility="private")
    interrupt.click(lambda job_id: _control(studio, job_id, "interrupt"), job_state, None, queue=False,
                    api_name="txt2img_interrupt")
    skip.click(lambda job_id: _control(studio, job_id, "skip"), job_state, None, queue=False,
               api_name="txt2img_skip")
    open_folder.click(lambda: _open_outputs(studio), None, folder_note, queue=False, api_visibility="private")
    return {"fields": f, "generate": generate, "progress": progress, "preview": preview, "error": error,
            "demo_note": demo_note, "gallery": gallery, "info": info, "job_state": job_state, "results": results}


def connect(studio: Any, ui: dict) -> None:
    """Wire Generate: its inputs include the checkpoint and VAE from the quicksettings row."""
    me, quick = ui["txt2img"], ui["quick"]
    names = list(FIELDS)
    outputs = [me["progress"], me["preview"], me["error"], me["gallery"], me["info"], me["demo_note"],
               me["job_state"], me["results"]]

    def run(checkpoint: str, vae: str, *values: Any):
        yield from _generate(studio, me, checkpoint, vae, dict(zip(names, values)))

    # named parameters for gradio_client and /docs of the /txt2img endpoint (A1111 field names)
    defaults = {**GenerationRequest().to_dict(), "checkpoint": "", "vae": "Automatic"}
    run.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[n])
         for n in ("checkpoint", "vae", *names)])

    me["generate"].click(run, [quick["checkpoint"], quick["vae"], *[me["fields"][n] for n in names]], outputs,
                         api_name="txt2img", show_progress="hidden", concurrency_id="gpu",
                         concurrency_limit=None)
    # concurrency_limit=None: the engine's queue already runs one job at a time, in submission order, for UI and
    # REST alike; letting every page submit at once shows each its true queue position and keeps
    # Interrupt/Skip per page.


def make_request(checkpoint: str | None, vae: str | None, fields: dict) -> GenerationRequest:
    """Widget values -> GenerationRequest, by field name. Sliders send floats: whole-number fields are cast."""
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name in INT_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        if value is None:
            raise StudioError(f"'{name}' is empty.", field=name, fix=f"enter a value for {name}")
        values[name] = value
    return GenerationRequest(checkpoint=checkpoint or "", vae=vae or "Automatic", **values)


def _generate(studio: Any, me: dict, checkpoint: str, vae: str, fields: dict):
    started = time.monotonic()
    try:
        job = studio.submit(make_request(checkpoint, vae, fields))
    except StudioError as exc:
        gr.Warning(str(exc))
        yield {me["error"]: error_html(str(exc)), me["progress"]: ""}
        return
    yield {me["job_state"]: job.id, me["error"]: "", me["progress"]: _progress_html(job),
           me["preview"]: gr.update(value=None, visible=studio.settings.preview_every > 0)}
    shown = 0
    while True:
        try:
            result = job.wait(POLL_SECONDS)
            break
        except TimeoutError:
            update = {me["progress"]: _progress_html(job)}
            preview_id, image = job.preview_snapshot()
            if preview_id != shown and image is not None:
                update[me["preview"]] = image
                shown = preview_id
            yield update
        except Exception as exc:  # noqa: BLE001 - the page gets a message, the log gets the traceback
            message = str(exc) if isinstance(exc, StudioError) else f"Generation failed: {type(exc).__name__}: {exc}"
            gr.Warning(message)
            yield {me["error"]: error_html(message), me["progress"]: "", me["preview"]: gr.update(visible=False),
                   me["job_state"]: None}
            return
    yield _finish(studio, me, job, result, time.monotonic() - started)


def _finish(studio: Any, me: dict, job: Any, result: Any, took: float) -> dict:
    out = {me["progress"]: "", me["preview"]: gr.update(value=None, visible=False), me["job_state"]: None}
    if result is None or not result.images:
        out[me["info"]] = note_html("Interrupted before any image was finished." if job.state == "interrupted"
                                    else "No images were made.")
        return out
    demo = is_demo_model(result.model_name)
    items = []
    for i, image in enumerate(result.images):
        caption = f"seed {result.seeds[i]}" + (" · untrained demo model" if demo else "")
        items.append((_png_for_gallery(me["gallery"], result, i, image), caption))
    state = {"seeds": list(result.seeds), "infotexts": list(result.infotexts), "selected": 0,
             "notes": _notes(result, job, took)}
    out.update({me["gallery"]: gr.update(value=items, selected_index=0), me["results"]: state,
                me["info"]: _info_html(state), me["demo_note"]: gr.update(visible=demo)})
    return out


def _png_for_gallery(gallery: Any, result: Any, index: int, image: Any) -> str:
    """A PNG that keeps the infotext chunk: the saved file's bytes, or a fresh PNG with the chunk.

    Gradio re-encodes PIL images without text chunks; a file copied into its cache keeps them, so a download
    from the gallery still carries its parameters. Copying also avoids needing --outdir in allowed_paths.
    """
    folder = Path(gallery.GRADIO_CACHE) / "studio-results"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{uuid.uuid4().hex}-{result.seeds[index]}.png"
    if index < len(result.paths) and os.path.isfile(result.paths[index]):
        shutil.copyfile(result.paths[index], target)
    else:
        from studio.infotext import png_text
        image.save(target, format="PNG", pnginfo=png_text(result.infotexts[index]))
    return str(target)


def _notes(result: Any, job: Any, took: float) -> list[str]:
    notes = list(result.warnings)
    if result.interrupted or job.state == "interrupted":
        p = job.progress
        notes.append(f"Interrupted at step {p.step}/{p.steps}.")
    notes.append(f"Time taken: {took:.1f} s")
    return notes


def _info_html(state: dict) -> str:
    texts = state.get("infotexts") or []
    if not texts:
        return ""
    i = min(max(int(state.get("selected", 0)), 0), len(texts) - 1)
    body = html.escape(texts[i]).replace("\n", "<br>")
    notes = "".join(f"<p class='studio-note'>{html.escape(n)}</p>" for n in state.get("notes", []))
    return f"<div class='studio-infotext'><p class='infotext'>{body}</p>{notes}</div>"


def _select_image(state: dict, evt: gr.SelectData):
    state = {**state, "selected": evt.index}
    return state, _info_html(state)


def _reuse_seed(state: dict, seed: Any) -> Any:
    seeds = state.get("seeds") or []
    return seeds[min(int(state.get("selected", 0)), len(seeds) - 1)] if seeds else seed


def _control(studio: Any, job_id: str | None, action: str) -> None:
    job = studio.queue.get(job_id) if job_id else None
    if job is None or job.done:
        job = studio.queue.current()
    if job is not None:
        getattr(job, action)()


def _outputs_folder(studio: Any) -> Path:
    return Path(studio.settings.outdir).resolve() / "txt2img-images"


def _open_outputs(studio: Any) -> str:
    """Open the folder in the desktop's file manager when the server runs on this desktop; else show the path."""
    folder = _outputs_folder(studio)
    folder.mkdir(parents=True, exist_ok=True)
    opener = {"win32": None, "darwin": "open"}.get(sys.platform, "xdg-open")
    try:
        if sys.platform == "win32":
            os.startfile(folder)  # type: ignore[attr-defined]  # noqa: S606
        elif shutil.which(opener) and (os.environ.get("DISPLAY") or sys.platform == "darwin"):
            subprocess.Popen([opener, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            return f"No desktop to open it here; the images are in `{folder}`"
    except OSError as exc:
        return f"Could not open the folder ({exc}); the images are in `{folder}`"
    return f"Opened `{folder}`"


def _progress_html(job: Any) -> str:
    p = job.progress
    if job.state == "queued":
        text, pct = f"Waiting in the queue (position {job.queue_position})…", 0
    elif not p.steps:
        text, pct = "Starting (loading the model on first use)…", 0
    else:
        pct = int(p.fraction * 100)
        eta = f" · ETA {p.eta_seconds:.0f} s" if p.eta_seconds else ""
        image = f"image {p.image_index + 1}/{p.images} · " if p.images > 1 else ""
        text = f"{image}step {p.step}/{p.steps} · {pct}%{eta}"
    return (f"<div class='studio-progress' data-state='{job.state}'><div class='studio-progress-bar' "
            f"style='width:{pct}%'></div><span class='studio-progress-text'>{html.escape(text)}</span></div>")
