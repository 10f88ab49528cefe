"""Train tab, the Run panel: Start / Stop / Resume, progress, the live loss chart, samples by step, the log,
Save / Load config (TOML), and what "Try it" needs once a run is done.

Status comes from ``studio.training.status()`` on a ``gr.Timer`` (not a long-running generator): a reloaded
page, or a run started through the REST API, is picked up by the next tick. The timer turns itself off when no
training is running or queued, and Start / Resume turn it on.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.training.config import TrainConfig
from webui import train_form
from webui.common import error_html, note_html
from webui.generation import HIDDEN

TICK_SECONDS = 1.0
_OPTION = re.compile(r"\s--(\w+)\s*")


def build(studio: Any) -> dict:
    r: dict[str, Any] = {}
    with gr.Row():
        r["start"] = gr.Button("Start training", variant="primary", elem_id="train_start", scale=2, min_width=120)
        r["stop"] = gr.Button("Stop", elem_id="train_stop", scale=1, min_width=90)
        r["resume"] = gr.Button("Resume", elem_id="train_resume", scale=1, min_width=90)
    r["progress"] = gr.HTML(_bar("Idle", 0), elem_id="train_progress")
    r["error"] = gr.HTML("", elem_id="train_error")
    r["loss"] = gr.LinePlot(None, x="step", y="loss", title="Loss", height=220, elem_id="train_loss",
                            x_title="step", y_title="loss")
    r["samples"] = gr.Gallery(label="Samples (by step)", columns=4, height=260, object_fit="contain",
                              format="png", interactive=False, elem_id="train_samples")
    r["result"] = gr.HTML("", elem_id="train_result")
    r["try"] = gr.Button("Try it in txt2img", variant="primary", visible=False, elem_id="train_try")
    with gr.Accordion("Log", open=False, elem_id="train_log_box"):
        r["log"] = gr.Textbox("", lines=10, max_lines=20, show_label=False, interactive=False,
                              elem_id="train_log", autoscroll=True)
    with gr.Accordion("Config file (TOML): the same run from the shell", open=False, elem_id="train_config_box"):
        with gr.Row():
            r["save_config"] = gr.Button("Save config (TOML)", elem_id="train_save_config", size="sm")
            r["load_config"] = gr.Button("Load config", elem_id="train_load_config", size="sm")
        r["config_path"] = gr.Textbox("", label="Config path on the server (Load reads it; Save writes run.toml "
                                      "into the run folder)", elem_id="train_config_path")
        r["config_file"] = gr.File(None, label="run.toml (download, or drop one to load)", file_types=[".toml"],
                                   elem_id="train_config_file", height=90)
        r["config_note"] = gr.HTML("", elem_id="train_config_note")
    r["history"] = gr.HTML(history_html(studio.training.history()), elem_id="train_history")
    with gr.Row(equal_height=True):
        r["refine_run"] = gr.Dropdown(refine_choices(studio), value=None, label="Finished run",
                                      elem_id="train_refine_run", scale=3)
        r["refine"] = gr.Button("Refine from this run", elem_id="train_refine", scale=2, min_width=120)
    r["refine_note"] = gr.HTML("", elem_id="train_refine_note")
    r["timer"] = gr.Timer(TICK_SECONDS, active=True)   # first tick on page load: adopt a running training
    # {"job": id this page follows, "n": losses shown, "samples": {src: cached copy}, "log": text, "try": {...}}
    r["state"] = gr.State({})
    return r


def wire(studio: Any, f: dict, r: dict) -> None:
    """Events of the Run panel; ``f`` is the form (field name -> widget)."""
    svc = studio.training
    names = [n for n in f]
    widgets = [f[n] for n in names]
    live = [r["progress"], r["loss"], r["samples"], r["log"], r["result"], r["try"], r["history"], r["state"],
            r["timer"], r["error"], r["refine_run"]]

    def form_config(values) -> dict:
        return train_form.to_config_dict(names, values)

    def fail(exc: StudioError) -> str:
        label = train_form.label_of(f, exc.field)
        return error_html(f"{label}: {exc}" if label else str(exc))

    def launch(submit, state):
        try:
            job = submit()
        except StudioError as exc:
            return fail(exc), state, gr.update(), gr.update(), gr.Timer(active=False)
        return "", {"job": job}, "", gr.update(visible=False), gr.Timer(active=True)

    def start(state, *values):
        return launch(lambda: svc.start(form_config(values), confined=True), state)

    def resume(state, *values):
        return launch(lambda: svc.resume(form_config(values)["output_name"]), state)

    ctl_out = [r["error"], r["state"], r["result"], r["try"], r["timer"]]
    r["start"].click(start, [r["state"], *widgets], ctl_out, api_visibility="private")
    r["resume"].click(resume, [r["state"], *widgets], ctl_out, api_visibility="private")
    def stop(state):
        mine = (state or {}).get("job")
        if mine and svc.cancel(mine):           # still waiting in the queue: just take it out
            return note_html("Removed the run from the queue; it never started.")
        if svc.stop():
            return note_html("Stopping: the trainer saves its state and a usable file, then exits.")
        return note_html("No training is running.")

    r["stop"].click(stop, r["state"], r["error"], **HIDDEN)
    r["timer"].tick(lambda state: tick(studio, r, state), r["state"], live, **HIDDEN)

    def save_config(*values):
        try:
            path = svc.write_config(form_config(values), confined=True)
        except StudioError as exc:
            return fail(exc), gr.update(), gr.update()
        msg = (f"Wrote <code>{html.escape(str(path))}</code>. Run it from a shell with "
               f"<code>python launch.py --train {html.escape(str(path))}</code>")
        return f"<div class='studio-note'>{msg}</div>", str(path), _download_copy(r["config_file"], path)

    def load_config(source, typed=True):
        source = (source or "").strip()
        if not source:
            return [note_html("Type a config path or drop a run.toml.")] + [gr.update()] * len(names)
        try:   # a typed path must lie inside the studio's folders; a dropped file is Gradio's upload
            cfg = svc.load_config(source) if typed else TrainConfig.load(source)
        except StudioError as exc:
            return [fail(exc)] + [gr.update()] * len(names)
        return [note_html(f"Loaded {Path(source).name}.")] + train_form.config_updates(studio, names, cfg)

    def refine(run, dataset_dir):
        if not run:
            return [note_html("Pick a finished run first.")] + [gr.update()] * len(names)
        try:
            cfg = svc.refine_config(run)
        except StudioError as exc:
            return [fail(exc)] + [gr.update()] * len(names)
        # the folder open in the Dataset section is what the artist means to refine on (e.g. pictures just sent
        # from a gallery); with none open, the run's own dataset
        cfg.dataset_dir = (dataset_dir or "").strip() or cfg.dataset_dir
        start = Path(cfg.controlnet_init or cfg.network_weights).name
        msg = (f"Refining {html.escape(run)}: the run starts from {html.escape(start)}, trains on "
               f"{html.escape(Path(cfg.dataset_dir).name)} (the dataset folder above) and saves "
               f"{html.escape(cfg.output_name)}. Set the steps, then Start.")
        return [note_html(msg)] + train_form.config_updates(studio, names, cfg)

    r["refine"].click(refine, [r["refine_run"], f["dataset_dir"]], [r["refine_note"], *widgets],
                      api_visibility="private")
    # runs finish in other pages, the API and the shell too: the list is re-read when it is opened, and only
    # re-sent when it changed (an open list is not re-rendered under the pointer)
    shown = gr.State(refine_choices(studio))

    def fresh_runs(old):
        now = refine_choices(studio)
        return (gr.update(), old) if now == old else (gr.update(choices=now), now)
    r["refine_run"].focus(fresh_runs, shown, [r["refine_run"], shown], **HIDDEN)
    r["save_config"].click(save_config, widgets, [r["config_note"], r["config_path"], r["config_file"]],
                           api_visibility="private")
    # the button reads the typed path; dropping a file loads that file (the box also holds Save's download)
    r["load_config"].click(load_config, r["config_path"], [r["config_note"], *widgets], api_visibility="private")
    r["config_file"].upload(lambda f: load_config(f, typed=False), r["config_file"], [r["config_note"], *widgets],
                            api_visibility="private")


def _download_copy(component: Any, path: Path) -> str:
    """A copy Gradio may serve, keeping the file's own name (``run.toml``) for the download."""
    import shutil
    import uuid
    folder = Path(component.GRADIO_CACHE) / "studio-train" / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    return str(shutil.copy(path, folder / path.name))


# ---- status ------------------------------------------------------------------------------------------------
def job_status(svc: Any, job_id: str | None) -> dict | None:
    """Status of the running job, or of a finished one of this session (``finished``: the service is done with
    it, the LoRA list is refreshed)."""
    cur = svc.status()["current"]
    if cur and cur["id"] == job_id:
        return {**cur, "finished": False}
    for job in reversed(svc.queue.finished):
        if job["id"] == job_id:
            proc = job.get("process")
            info = proc.status() if proc else {"outputs": [], "losses": [], "samples": []}
            return {**info, "id": job_id, "state": job["state"], "error": job["error"] or info.get("error"),
                    "config": job["config"], "finished": True}
    return None


def tick(studio: Any, r: dict, state: dict) -> dict:
    svc = studio.training
    state = dict(state or {})
    status = svc.status()
    cur, queued = status["current"], [q["id"] for q in status["queued"]]
    mine = state.get("job")
    if mine in queued:
        pos = queued.index(mine) + 1
        return {r["progress"]: _bar(f"Waiting: another training runs first (position {pos} in the queue)", 0),
                r["state"]: state}
    if cur and cur["id"] != mine and (mine is None or state.get("done")):
        mine = cur["id"]                     # adopt a run started elsewhere (REST API, another page, a reload)
        state = {"job": mine}
    info = job_status(svc, mine) if mine else None
    active = bool(cur or queued) or bool(info and not info["finished"])
    out: dict = {r["state"]: state, r["timer"]: gr.Timer(active=active)}
    if info is None or state.get("done"):
        return out
    out[r["progress"]] = progress_html(info)
    losses = info.get("losses") or []
    if len(losses) != state.get("n", 0):
        import pandas as pd
        state["n"] = len(losses)
        out[r["loss"]] = pd.DataFrame(losses, columns=["step", "loss"])
    samples = info.get("samples") or []
    copied = dict(state.get("samples") or {})
    if len(samples) != len(copied):
        from webui.generation import copy_to_cache
        items = []
        for s in sorted(samples, key=lambda s: (s["step"], s["index"])):
            if s["path"] not in copied and Path(s["path"]).is_file():
                copied[s["path"]] = copy_to_cache(r["samples"], s["path"])
            if s["path"] in copied:
                items.append((copied[s["path"]], f"step {s['step']} · {s['prompt'][:60]}"))
        state["samples"] = copied
        out[r["samples"]] = items
    log = info.get("log") or ""
    if log != state.get("log"):
        state["log"] = out[r["log"]] = log
    if info["finished"]:
        state["done"] = True
        out[r["error"]] = ""                 # "Stopping: ..." from the Stop button is over; the result says how
        out.update(_finished(studio, r, state, info))
    return out


def _finished(studio: Any, r: dict, state: dict, info: dict) -> dict:
    outputs = info.get("outputs") or []
    final = [p for p in outputs if not re.search(r"-\d{6}\.safetensors$", p)] or outputs
    out = {r["history"]: history_html(studio.training.history()),
           r["refine_run"]: gr.update(choices=refine_choices(studio))}
    if info.get("state") == "stopped" and not final and not info.get("error"):
        # stopped before the first step (class images, caching): nothing to save, and nothing went wrong
        out[r["result"]] = note_html("Stopped before the first training step; nothing was written.")
        out[r["try"]] = gr.update(visible=False)
        return out
    if info.get("state") == "error" or not final:
        why = info.get("error") or "the trainer wrote no file; see the log"
        out[r["result"]] = error_html(f"Training {info.get('state')}: {why}")
        out[r["try"]] = gr.update(visible=False)
        return out
    cfg = TrainConfig.load(info["config"]) if info.get("config") else TrainConfig()
    state["try"] = {"name": Path(final[-1]).stem, "ti": cfg.is_ti, "token": cfg.token,
                    "controlnet": cfg.conditioning if cfg.is_controlnet else "", "steps": cfg.sample_steps,
                    "sample": (cfg.sample_prompts or "").strip(), "instance": cfg.instance_prompt,
                    "base": cfg.base_model}
    verb = "Stopped early; saved" if info.get("state") == "stopped" else "Done: saved"
    out[r["result"]] = note_html(f"{verb} {Path(final[-1]).name} ({Path(final[-1]).parent}).")
    out[r["try"]] = gr.update(visible=True)
    return out


def progress_html(info: dict) -> str:
    step, total = info.get("step") or 0, info.get("total") or 0
    state = info.get("state", "")
    if not total:
        return _bar({"queued": "Queued…", "preparing": "Preparing (class images, freeing device memory)…",
                     "running": "Starting: loading the model and caching latents…"}
                    .get(state, state.capitalize() or "Starting…"), 0, state)
    bits = [f"{state} · step {step}/{total}"]
    if info.get("loss") is not None:
        bits.append(f"loss {info['loss']:.4f}")
    if info.get("it_s"):
        bits.append(f"{info['it_s']:.2f} it/s")
    if info.get("eta") is not None and state == "running":
        bits.append(f"ETA {info['eta']:.0f} s")
    if info.get("epoch") is not None:
        bits.append(f"epoch {info['epoch']}")
    return _bar(" · ".join(bits), int(100 * step / total), state)


def _bar(text: str, pct: int, state: str = "idle") -> str:
    return (f"<div class='studio-progress' data-state='{html.escape(state)}'><div class='studio-progress-bar' "
            f"style='width:{pct}%'></div><span class='studio-progress-text'>{html.escape(text)}</span></div>")


def refine_choices(studio: Any) -> list[tuple[str, str]]:
    return [(f"{run} · {final.name}", run) for run, final in studio.training.finished_runs()]


def history_html(history: list[dict]) -> str:
    rows = []
    for h in history[:8]:
        name = Path(h["config"]).parent.name
        outs = ", ".join(Path(p).name for p in h.get("outputs", [])[-1:])
        data = h.get("dataset") or {}
        read = (f"{Path(data['dataset_dir']).name} v{data['version']} ({data['images']} images)"
                if data.get("version") else "")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(h['state']))}</td>"
                    f"<td>{html.escape(outs)}</td><td>{html.escape(read)}</td></tr>")
    if not rows:
        return ""
    return ("<details class='studio-note'><summary>Recent runs</summary><table class='studio-params'>"
            f"<tr><th>run</th><th>state</th><th>output</th><th>dataset</th></tr>{''.join(rows)}</table></details>")


# ---- "Try it" ----------------------------------------------------------------------------------------------
def try_it_text(tried: dict, trigger: str, base_title: str | None) -> str:
    """An A1111 infotext for txt2img: the LoRA tag (or embedding), the trigger word and the first sample prompt,
    with the sample's kohya options (--n --w --h --d --l --s) as the matching parameters; a ControlNet goes into
    unit 0 (its ``ControlNet 0`` parameter) with the preprocessor it was trained on."""
    sample = tried.get("sample", "")
    if sample and "\n" not in sample and Path(sample).is_file():     # a kohya prompt file: its first prompt
        sample = Path(sample).read_text(encoding="utf-8", errors="replace")
    first = next((ln.strip() for ln in sample.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
    parts = _OPTION.split(" " + first)
    prompt, opts = parts[0].strip(), dict(zip(parts[1::2], (v.strip() for v in parts[2::2])))
    name = tried["name"]
    unit = None
    if tried.get("controlnet"):
        module = "none" if tried["controlnet"] == "folder" else tried["controlnet"]
        unit = f'"Module: {module}, Model: {name}, Weight: 1, Guidance Start: 0, Guidance End: 1"'
    elif tried.get("ti"):
        token = tried.get("token") or ""
        prompt = prompt.replace(token, name) if token and token in prompt else ", ".join(filter(None, [name, prompt]))
    else:
        words = trigger.strip() or tried.get("instance", "").strip()
        head = [f"<lora:{name}:1>"] + ([words] if words and words not in prompt else [])
        prompt = ", ".join(filter(None, [*head, prompt]))
    lines = [prompt]
    if opts.get("n"):
        lines.append(f"Negative prompt: {opts['n']}")
    params = {"Steps": opts.get("s"), "CFG scale": opts.get("l"), "Seed": opts.get("d"),
              "Size": f"{opts['w']}x{opts['h']}" if opts.get("w") and opts.get("h") else None, "Model": base_title}
    params = {k: v for k, v in params.items() if v}
    if unit:
        # A1111 reads a last line as parameters only with 3 or more of them
        params = {"Steps": tried.get("steps") or 20, **params, "ControlNet 0": unit}
    if params:
        lines.append(", ".join(f"{k}: {v}" for k, v in params.items()))
    return "\n".join(lines)
