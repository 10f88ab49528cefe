"""What every generating tab (txt2img, img2img, Inpaint) shares: the prompt row, the sampling options, the
output panel with its "Send to" buttons, and the runner that submits a request and polls its Job.

Element ids are ``<prefix>_<part>`` (``txt2img_prompt``, ``img2img_gallery``...), so tests and user CSS can
address each tab's copy. Generation always goes through ``studio.submit`` (the engine's one FIFO queue).
"""
from __future__ import annotations

import html
import inspect
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator

import gradio as gr

from studio.errors import StudioError
from studio.request import GenerationRequest
from studio.samplers import SAMPLERS, SCHEDULE_TYPES
from webui.common import TokenCounter, error_html, note_html
from webui.icons import icon_button
from webui.model_lists import model_list

POLL_SECONDS = 0.2
SEND_TARGETS = (("img2img", "Send to img2img"), ("inpaint", "Send to inpaint"), ("controlnet", "Send to ControlNet"))
INT_FIELDS = frozenset({"steps", "width", "height", "n_iter", "batch_size", "seed", "subseed", "clip_skip", "resize_mode",
              "mask_blur", "inpainting_fill", "inpaint_full_res_padding", "inpainting_mask_invert",
              "hr_second_pass_steps", "hr_resize_x", "hr_resize_y"})
BOOL_FIELDS = frozenset({"enable_hr", "inpaint_full_res"})
HIDDEN = MappingProxyType({"queue": False, "api_visibility": "private"})   # helper events: not in the API


def prompt_row(prefix: str, counter: TokenCounter) -> dict:
    """Prompt + negative prompt with CLIP token counters; Generate / Interrupt / Skip on the right."""
    f: dict[str, Any] = {}
    with gr.Row(elem_id=f"{prefix}_toprow"):
        with gr.Column(scale=6):
            tokens = gr.HTML(counter.html(""), elem_id=f"{prefix}_token_counter", elem_classes=["token-box"])
            f["prompt"] = gr.Textbox("", label="Prompt", lines=3, elem_id=f"{prefix}_prompt",
                                     placeholder="Prompt (A1111 syntax: (word:1.2), [word], BREAK, <lora:name:1>)")
            neg_tokens = gr.HTML(counter.html(""), elem_id=f"{prefix}_neg_token_counter", elem_classes=["token-box"])
            f["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=2, elem_id=f"{prefix}_neg_prompt")
        with gr.Column(scale=1, min_width=200):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{prefix}_generate", size="lg")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id=f"{prefix}_interrupt", size="sm")
                skip = gr.Button("Skip", elem_id=f"{prefix}_skip", size="sm")
    live = dict(show_progress="hidden", trigger_mode="always_last", **HIDDEN)
    f["prompt"].change(counter.html, f["prompt"], tokens, **live)
    f["negative_prompt"].change(counter.html, f["negative_prompt"], neg_tokens, **live)
    return {"fields": f, "generate": generate, "interrupt": interrupt, "skip": skip}


def size_sliders(prefix: str, studio: Any, f: dict) -> None:
    """Width / height sliders with the ⇅ swap button, into ``f``."""
    s, d = studio.settings, GenerationRequest()
    with gr.Row():
        with gr.Column(scale=5, min_width=200):
            f["width"] = gr.Slider(64, s.max_width, value=d.width, step=8, label="Width", elem_id=f"{prefix}_width")
            f["height"] = gr.Slider(64, s.max_height, value=d.height, step=8, label="Height",
                                    elem_id=f"{prefix}_height")
        swap = gr.Button("⇅", elem_id=f"{prefix}_swap", scale=0, min_width=48, size="sm")
    swap.click(lambda w, h: (h, w), [f["width"], f["height"]], [f["width"], f["height"]], **HIDDEN)


def sampling_options(prefix: str, studio: Any, f: dict, *, size: bool = True,
                     extra: Callable[[dict], None] | None = None) -> dict:
    """Sampler, steps, (size), batch, CFG, seed + variation, clip skip, into ``f``; returns the seed buttons.

    ``extra(f)`` adds tab-specific options (denoising strength...) right after the size.
    """
    s, d = studio.settings, GenerationRequest()
    with gr.Row():
        f["sampler_name"] = gr.Dropdown(list(SAMPLERS), value=d.sampler_name, label="Sampling method",
                                        elem_id=f"{prefix}_sampling")
        f["scheduler"] = gr.Dropdown(list(SCHEDULE_TYPES), value=d.scheduler, label="Schedule type",
                                     elem_id=f"{prefix}_scheduler")
    f["steps"] = gr.Slider(1, s.max_steps, value=d.steps, step=1, label="Sampling steps", elem_id=f"{prefix}_steps")
    if size:
        size_sliders(prefix, studio, f)
    if extra:
        extra(f)
    with gr.Row():
        f["n_iter"] = gr.Slider(1, s.max_batch_count, value=d.n_iter, step=1, label="Batch count",
                                elem_id=f"{prefix}_batch_count")
        f["batch_size"] = gr.Slider(1, s.max_batch_size, value=d.batch_size, step=1, label="Batch size",
                                    elem_id=f"{prefix}_batch_size")
    f["cfg_scale"] = gr.Slider(1, 30, value=d.cfg_scale, step=0.5, label="CFG Scale", elem_id=f"{prefix}_cfg")
    # Forge's slider: the guidance input of guidance-distilled models (FLUX.1 dev); other models ignore it
    f["distilled_cfg_scale"] = gr.Slider(0, 30, value=d.distilled_cfg_scale, step=0.5, label="Distilled CFG Scale",
                                         elem_id=f"{prefix}_distilled_cfg",
                                         info="FLUX.1 dev's guidance; set CFG Scale to 1 for it (no negative pass)")
    with gr.Row():
        f["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{prefix}_seed", scale=5)
        random_seed = icon_button("Random seed (-1)", "dice", elem_id=f"{prefix}_random_seed", scale=0,
                                  min_width=48, size="sm")
        reuse_seed = icon_button("Reuse the seed of the selected image", "reuse", elem_id=f"{prefix}_reuse_seed",
                                 scale=0, min_width=48, size="sm")
    with gr.Accordion("Variation seed", open=False, elem_id=f"{prefix}_variation"):
        with gr.Row():
            f["subseed"] = gr.Number(value=-1, precision=0, label="Variation seed", elem_id=f"{prefix}_subseed")
            f["subseed_strength"] = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                              elem_id=f"{prefix}_subseed_strength")
    f["clip_skip"] = gr.Slider(1, 12, value=d.clip_skip, step=1, label="Clip skip", elem_id=f"{prefix}_clip_skip")
    random_seed.click(lambda: -1, None, f["seed"], **HIDDEN)
    return {"reuse_seed": reuse_seed}


def output_panel(prefix: str, studio: Any, folder: str) -> dict:
    """Progress, live preview, errors, the gallery (PNG, so infotext survives), Send-to buttons and infotext."""
    out: dict[str, Any] = {"prefix": prefix}
    out["progress"] = gr.HTML("", elem_id=f"{prefix}_progress")
    out["preview"] = gr.Image(label="Live preview", visible=False, format="png", interactive=False,
                              elem_id=f"{prefix}_preview", height=256)
    out["error"] = gr.HTML("", elem_id=f"{prefix}_error")
    out["note"] = gr.HTML("", elem_id=f"{prefix}_note")     # e.g. what "Send to" could not carry over
    out["gallery"] = gr.Gallery(label="Output", format="png", columns=4, height="auto", interactive=False,
                                elem_id=f"{prefix}_gallery", object_fit="contain")
    with gr.Row(elem_id=f"{prefix}_send_row", elem_classes=["send-row"]):
        out["send"] = {target: gr.Button(label, elem_id=f"{prefix}_send_{target}", size="sm", min_width=120)
                       for target, label in SEND_TARGETS}
        open_folder = icon_button("Open outputs folder", "folder", text=True, elem_id=f"{prefix}_open_folder",
                                  size="sm", min_width=160)
    with gr.Row(elem_id=f"{prefix}_dataset_row", elem_classes=["send-row"], equal_height=True):
        out["dataset"] = model_list(gr.Dropdown(studio.training.dataset_names(), value=None, allow_custom_value=True,
                                                label="Dataset (pick one, or type a new name)", scale=3,
                                                elem_id=f"{prefix}_dataset", min_width=160), "dataset")
        out["send_dataset"] = gr.Button("Send to dataset", elem_id=f"{prefix}_send_dataset", size="sm", scale=1,
                                        min_width=120)
    path = Path(studio.settings.outdir).resolve() / f"{folder}-images"
    folder_note = gr.Markdown(f"Saved to `{path}`", elem_id=f"{prefix}_folder")
    out["info"] = gr.HTML("", elem_id=f"{prefix}_info")
    out["job_state"] = gr.State(None)    # this page's job id, so Interrupt/Skip act on its own job
    out["results"] = gr.State({"seeds": [], "infotexts": [], "paths": [], "selected": 0})
    out["gallery"].select(_select_image, out["results"], [out["results"], out["info"]], **HIDDEN)
    out["send_dataset"].click(lambda results, name: send_to_dataset(studio, results, name),
                              [out["results"], out["dataset"]], [out["note"], out["dataset"]], **HIDDEN)
    open_folder.click(lambda: _open_folder(path), None, folder_note, **HIDDEN)
    return out


def wire_controls(studio: Any, me: dict, seed_buttons: dict) -> None:
    """Interrupt / Skip (this page's job, else the running one) and reuse-seed (seed of the selected image)."""
    prefix = me["prefix"]
    # queue=False: the status says "Interrupting…" at once, though the engine stops only at the step's end
    me["interrupt"].click(lambda job_id: _interrupt_now(studio, job_id), me["job_state"], me["progress"],
                          queue=False, api_name=f"{prefix}_interrupt", show_progress="hidden")
    me["skip"].click(lambda job_id: _control(studio, job_id, "skip"), me["job_state"], None, queue=False,
                     api_name=f"{prefix}_skip")
    seed_buttons["reuse_seed"].click(_reuse_seed, [me["results"], me["fields"]["seed"]], me["fields"]["seed"],
                                     **HIDDEN)


def outputs_of(me: dict) -> list:
    return [me["progress"], me["preview"], me["error"], me["gallery"], me["info"],
            me["job_state"], me["results"], me["note"]]


def api_signature(fn: Callable, names: list[str], defaults: dict) -> Callable:
    """Named parameters for gradio_client and the API page (A1111 field names)."""
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(n)) for n in names])
    return fn


def coerce(fields: dict) -> dict:
    """Widget values -> request values: sliders send floats, radios send ints for switches."""
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None:
            raise StudioError(f"'{name}' is empty.", field=name, fix=f"enter a value for {name}")
        if name in INT_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        if name in BOOL_FIELDS:
            value = bool(value)
        values[name] = value
    return values


def make_request(checkpoint: str | None, vae: str | None, fields: dict, **extra: Any) -> GenerationRequest:
    """Widget values -> GenerationRequest, by field name; ``extra`` (images, mode...) goes in unchanged."""
    return GenerationRequest(checkpoint=checkpoint or "", vae=vae or "Automatic", **coerce(fields), **extra)


def error_update(me: dict, exc: BaseException) -> dict:
    message = str(exc) if isinstance(exc, StudioError) else f"Generation failed: {type(exc).__name__}: {exc}"
    gr.Warning(message)
    return {me["error"]: error_html(message), me["progress"]: "", me["preview"]: gr.update(visible=False),
            me["job_state"]: None}


def run_job(studio: Any, me: dict, request: GenerationRequest | Callable[[], GenerationRequest]) -> Iterator[dict]:
    """Submit and poll: yields progress / preview updates, then the gallery, infotext and warnings."""
    started = time.monotonic()
    try:
        job = studio.submit(request() if callable(request) else request)
    except StudioError as exc:
        yield error_update(me, exc)
        return
    yield {me["job_state"]: job.id, me["error"]: "", me["progress"]: progress_html(job),
           me["preview"]: gr.update(value=None, visible=studio.settings.preview_every > 0)}
    shown = 0
    while True:
        try:
            result = job.wait(POLL_SECONDS)
            break
        except TimeoutError:
            update = {me["progress"]: progress_html(job)}
            preview_id, image = job.preview_snapshot()
            if preview_id != shown and image is not None:
                update[me["preview"]] = image
                shown = preview_id
            yield update
        except Exception as exc:  # noqa: BLE001 - the page gets a message, the log gets the traceback
            yield error_update(me, exc)
            return
    yield finish(me, job, result, time.monotonic() - started)


def finish(me: dict, job: Any, result: Any, took: float) -> dict:
    out = {me["progress"]: "", me["preview"]: gr.update(value=None, visible=False), me["job_state"]: None,
           me["note"]: ""}
    if result is None or not result.images:
        out[me["info"]] = note_html("Interrupted before any image was finished." if job.state == "interrupted"
                                    else "No images were made.")
        return out
    items = [(gallery_png(me["gallery"], result, i, image), f"seed {result.seeds[i]}")
             for i, image in enumerate(result.images)]
    for i, detected in enumerate(getattr(result, "control_maps", None) or []):   # after the images, as A1111
        target = _cache_folder(me["gallery"]) / f"{uuid.uuid4().hex}-controlnet{i}.png"
        detected.save(target, format="PNG")
        items.append((str(target), f"ControlNet {i} detected map"))
    notes = list(result.warnings)
    if result.interrupted or job.state == "interrupted":
        notes.append(f"Interrupted at step {job.progress.step}/{job.progress.steps}.")
    notes.append(f"Time taken: {took:.1f} s")
    state = {"seeds": list(result.seeds), "infotexts": list(result.infotexts), "paths": [p for p, _ in items],
             "selected": 0, "notes": notes}
    out.update({me["gallery"]: gr.update(value=items, selected_index=0), me["results"]: state,
                me["info"]: info_html(state)})
    return out


def gallery_png(gallery: Any, result: Any, index: int, image: Any) -> str:
    """A PNG in Gradio's cache that keeps the infotext chunk (the saved file's bytes, or a fresh PNG).

    Gradio re-encodes PIL images without text chunks; a copied file keeps them, so downloads and "Send to" carry
    the parameters. Copying also avoids needing --outdir in allowed_paths.
    """
    if index < len(result.paths) and os.path.isfile(result.paths[index]):
        return copy_to_cache(gallery, result.paths[index])
    from studio.infotext import png_text
    target = _cache_folder(gallery) / f"{uuid.uuid4().hex}-{result.seeds[index]}.png"
    image.save(target, format="PNG", pnginfo=png_text(result.infotexts[index]))
    return str(target)


def copy_to_cache(component: Any, path: str) -> str:
    """A copy of ``path`` that Gradio may serve (its cache), whatever folder the file is in."""
    target = _cache_folder(component) / f"{uuid.uuid4().hex}-{Path(path).name}"
    shutil.copyfile(path, target)
    return str(target)


def _cache_folder(component: Any) -> Path:
    folder = Path(component.GRADIO_CACHE) / "studio-results"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def info_html(state: dict) -> str:
    texts = state.get("infotexts") or []
    if not texts:
        return ""
    i = min(max(int(state.get("selected", 0)), 0), len(texts) - 1)
    body = html.escape(texts[i]).replace("\n", "<br>")
    notes = "".join(f"<p class='studio-note'>{html.escape(n)}</p>" for n in state.get("notes", []))
    return f"<div class='studio-infotext'><p class='infotext'>{body}</p>{notes}</div>"


def send_to_dataset(studio: Any, results: dict | None, dataset: str) -> tuple[str, Any]:
    """The selected picture into a dataset with its prompt as the caption (``TrainingService.add_to_dataset``):
    the note says where it went and the dataset's version now."""
    path, text = selected(results)
    if not path:
        return note_html("Nothing to send: make or select an image first."), gr.update()
    if not (dataset or "").strip():
        return error_html("Pick a dataset, or type a new name, then Send to dataset."), gr.update()
    try:
        # gallery files are cached copies named <hash>-<output name>: the dataset gets the output's own name
        name = re.sub(r"^[0-9a-f]{16,}-", "", Path(path).stem)
        target, caption, version, added = studio.training.add_to_dataset(dataset.strip(), path, infotext=text,
                                                                         name=name)
    except StudioError as exc:
        return error_html(str(exc)), gr.update()
    where = html.escape(f"{target.parent.name}/{target.name}")
    if not added:
        return note_html(f"Already in the dataset as {where}; nothing added."), gr.update()
    return (note_html(f"Added {where} to {html.escape(dataset.strip())} (version {version['version']}, "
                      f"{version['images']} pictures), caption: {html.escape(caption) or '(none)'}"),
            gr.update(choices=studio.training.dataset_names(), value=dataset.strip()))


def selected(state: dict | None) -> tuple[str | None, str]:
    """(image path, infotext) of the gallery's selected image, or (None, "")."""
    paths = (state or {}).get("paths") or []
    if not paths:
        return None, ""
    i = min(max(int(state.get("selected", 0)), 0), len(paths) - 1)
    texts = state.get("infotexts") or []
    return paths[i], texts[i] if i < len(texts) else ""


def progress_html(job: Any, prefix_text: str = "") -> str:
    p = job.progress
    if getattr(job, "interrupt_requested", False) and not job.done:
        return interrupting_html(p.fraction if p.steps else 0.0, p.step, p.steps)
    if job.state == "queued":
        text, pct = f"Waiting in the queue (position {job.queue_position})…", 0
    elif not p.steps:
        text, pct = "Starting (loading the model on first use)…", 0
    else:
        pct = int(p.fraction * 100)
        eta = f" · ETA {p.eta_seconds:.0f} s" if p.eta_seconds else ""
        batch = getattr(p, "batch", 1)
        if p.images <= 1 or batch >= p.images:   # one batch: its images advance together
            image = ""
        elif batch > 1:
            image = f"images {p.image_index + 1}-{min(p.image_index + batch, p.images)}/{p.images} · "
        else:
            image = f"image {p.image_index + 1}/{p.images} · "
        text = f"{image}step {p.step}/{p.steps} · {pct}%{eta}"
    return (f"<div class='studio-progress' data-state='{job.state}'><div class='studio-progress-bar' "
            f"style='width:{pct}%'></div><span class='studio-progress-text'>{html.escape(prefix_text + text)}"
            "</span></div>")


INTERRUPTING = "Interrupting… (the current step finishes first)"


def interrupting_html(fraction: float = 0.0, step: int = 0, steps: int = 0) -> str:
    at = f" · at step {step}/{steps}" if steps else ""
    return (f"<div class='studio-progress' data-state='interrupting'><div class='studio-progress-bar' "
            f"style='width:{int(fraction * 100)}%'></div><span class='studio-progress-text'>"
            f"{html.escape(INTERRUPTING + at)}</span></div>")


def progress_html_text(text: str) -> str:
    return (f"<div class='studio-progress'><div class='studio-progress-bar' style='width:0%'></div>"
            f"<span class='studio-progress-text'>{html.escape(text)}</span></div>")


def _select_image(state: dict, evt: gr.SelectData):
    state = {**state, "selected": evt.index}
    return state, info_html(state)


def _reuse_seed(state: dict, seed: Any) -> Any:
    seeds = state.get("seeds") or []
    return seeds[min(int(state.get("selected", 0)), len(seeds) - 1)] if seeds else seed


def _interrupt_now(studio: Any, job_id: str | None) -> Any:
    """Interrupt, and show it at once (nothing running: the status stays as it is)."""
    job = _control(studio, job_id, "interrupt")
    return progress_html(job) if job is not None and not job.done else gr.update()


def _control(studio: Any, job_id: str | None, action: str) -> Any:
    job = studio.queue.get(job_id) if job_id else None
    if job is None or job.done:
        job = studio.queue.current()
    if job is not None:
        getattr(job, action)()
    return job


def _open_folder(folder: Path) -> str:
    """Open the folder in the desktop's file manager when the server runs on this desktop; else show the path."""
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
