"""Settings: edit the typed settings, save them to <data-dir>/settings.json and apply what can be applied live.

Device, precision and offload decide how models are placed when the pipeline manager is built, so they take
effect at the next start; folders, budgets, output options, defaults and limits apply at once.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.settings import DEVICES, OFFLOAD_MODES, PRECISIONS, QUANTIZE_MODES, SDPA_BACKENDS, Settings
from webui.common import error_html

# (section, [(field, label)]) in display order
SECTIONS = [
    ("Device and memory", [
        ("device", "Device"), ("precision", "Precision (dtype)"), ("offload", "Offload mode (medvram / lowvram)"),
        ("no_half_vae", "Keep the VAE in fp32 (--no-half-vae)"), ("xformers", "xformers attention (CUDA only)"),
        ("vram_budget_mb", "Device memory budget for cached models, MB (0: from free memory)"),
        ("ram_budget_mb", "RAM budget for cached models, MB (0: from system RAM)"),
        ("lora_patch_cache_mb", "LoRA-patched weights kept for quick re-use, MB (0: off; -1: a quarter of the RAM "
                                "budget)"),
        ("pin_memory", "Keep models parked in RAM in page-locked memory (faster RAM ↔ VRAM moves; CUDA only)"),
        ("allow_tf32", "TF32 for fp32 math on Ampere and newer GPUs"),
        ("cudnn_benchmark", "cuDNN benchmark (autotunes convolutions per image size; always on for GTX 16xx)"),
        ("annotator_device", "ControlNet preprocessor models run on (auto: the compute device)"),
        ("quantize", "Weight quantisation (int8: linear layers at a quarter of fp32 / half of fp16, any device, not "
                     "faster, the picture changes a little; fp8: storage on CUDA; next model load)"),
    ]),
    ("Speed", [
        ("deepcache_interval", "DeepCache: the whole UNet every N-th step, only its outer blocks between (1: off; "
                               "UNet models only; changes the picture a little)"),
        ("deepcache_start", "DeepCache starts after this share of the steps (they lay the picture out)"),
        ("channels_last", "channels_last memory format for UNets (faster convolutions on NVIDIA tensor cores)"),
        ("fused_qkv", "Fused QKV projections: one matmul for attention's q / k / v (rebuilt when LoRAs change them)"),
        ("sdpa_backend", "Attention kernel (scaled_dot_product_attention backend; auto: PyTorch picks)"),
        ("compile_backend", "torch.compile the UNet / transformer with this backend (off; inductor is torch's; each "
                            "new image size compiles once)"),
        ("vae_tiling", "VAE tiling: large images decode and encode in tiles (less memory)"),
        ("queue_batch", "Dynamic batching: up to N images of compatible waiting txt2img jobs (same model, size, "
                        "steps, sampler, LoRAs) run as one batch (1: each job alone)"),
        ("onnx_runtime", "Run the UNet and VAE on onnxruntime from the checkpoint's ONNX export (the button below "
                         "makes it; the picture differs slightly from torch's; LoRA prompts run on torch)"),
    ]),
    ("Outputs", [
        ("outdir", "Output folder"),
        ("filename_pattern", "File name pattern (after the 00000- counter; A1111 tags: [seed] [prompt_words] "
                             "[model_name] [datetime<%Y%m%d>] ...)"),
        ("save_images", "Save every generated image"),
    ]),
    ("Defaults and limits", [
        ("default_checkpoint", "Checkpoint to use when none is chosen"), ("default_vae", "Default VAE"),
        ("preview_every", "Live preview every N steps (0: off)"), ("max_steps", "Max sampling steps"),
        ("max_width", "Max width"), ("max_height", "Max height"), ("max_batch_size", "Max batch size"),
        ("max_batch_count", "Max batch count"), ("max_prompt_length", "Max prompt length (characters)"),
        ("max_prompt_chunks", "Max prompt chunks (75 tokens each; BREAK starts one)"),
        ("allow_download", "Allow Hugging Face downloads"),
    ]),
    ("Model folders (empty: inside the models folder)", [
        ("models_dir", "Models folder"), ("ckpt_dir", "Checkpoints (Stable-diffusion)"), ("vae_dir", "VAE"),
        ("lora_dir", "Lora"), ("lycoris_dir", "LyCORIS"), ("embeddings_dir", "Embeddings"),
        ("controlnet_dir", "ControlNet"), ("annotators_dir", "Annotators"),
    ]),
]
CHOICES = {"device": list(DEVICES), "precision": list(PRECISIONS), "offload": list(OFFLOAD_MODES),
           "annotator_device": ["auto", "cpu"], "quantize": list(QUANTIZE_MODES),
           "sdpa_backend": list(SDPA_BACKENDS),
           "compile_backend": [("off", ""), ("inductor", "inductor"), ("cudagraphs", "cudagraphs"),
                               ("aot_eager", "aot_eager"), ("eager", "eager")]}
# placement and dtype are fixed when the pipeline manager is built; downloads are allowed (or not) at start
RESTART = {"device", "precision", "offload", "no_half_vae", "xformers", "allow_download", "allow_tf32",
           "cudnn_benchmark", "annotator_device"}
FOLDERS = {"models_dir", "ckpt_dir", "vae_dir", "lora_dir", "lycoris_dir", "embeddings_dir", "controlnet_dir",
           "annotators_dir"}
# -1 means "derived from another setting"
DERIVED = {"lora_patch_cache_mb"}
# slider ranges on the txt2img tab are drawn once; the limits themselves are checked live on every request
RELOAD = {"max_steps", "max_width", "max_height", "max_batch_size", "max_batch_count"}


def build(studio: Any) -> dict:
    s = studio.settings
    names = [name for _, fields in SECTIONS for name, _ in fields]
    widgets: dict[str, Any] = {}
    status = gr.Markdown(lambda: _status(studio), elem_id="settings_status")  # a callable re-reads per page load
    with gr.Row():
        save = gr.Button("Save settings", variant="primary", elem_id="settings_save", scale=0, min_width=200)
        message = gr.HTML("", elem_id="settings_message")
    for title, fields in SECTIONS:
        with gr.Accordion(title, open=True):
            # switches get a row of their own: squeezed between number boxes, their labels wrap a word per line
            switches = [(n, lbl) for n, lbl in fields if isinstance(getattr(s, n), bool)]
            for row in ([f for f in fields if f not in switches], switches):
                if row:
                    with gr.Row():
                        for name, label in row:
                            widgets[name] = _widget(name, label, getattr(s, name))
            if title == "Speed":
                onnx_export = _onnx_export_row(studio)
    gr.Markdown(f"Settings file: `{Path(s.settings_file).resolve()}`. Flags given to launch.py override the file "
                "for the run they are given to.")
    save.click(lambda *values: _save(studio, dict(zip(names, values))), [widgets[n] for n in names],
               [message, status], api_visibility="private", queue=False)
    return {"widgets": widgets, "save": save, "message": message, "onnx_export": onnx_export}


def _onnx_export_row(studio: Any) -> Any:
    with gr.Row():
        button = gr.Button("Export current checkpoint to ONNX", elem_id="settings_onnx_export", scale=0,
                           min_width=280)
        result = gr.HTML("", elem_id="settings_onnx_message")
    button.click(lambda: export_onnx(studio), [], [result], api_visibility="private")
    return button


def export_onnx(studio: Any) -> str:
    """The button: export the current checkpoint through the job queue; what was written, or why not."""
    from studio.onnx.export import export_checkpoint   # torch-free until the export runs
    try:
        out = export_checkpoint(studio, "")
    except (StudioError, OSError, RuntimeError) as exc:
        return error_html(f"Not exported: {exc}")
    return (f"<p class='studio-note'>Exported {html.escape(out.title)} to {html.escape(str(out.folder))}: "
            f"{len(out.files)} files, {out.total_bytes / 1e6:.1f} MB, in {out.seconds:.0f} s. Switch on "
            "\"Run the UNet and VAE on onnxruntime\" and save to use it.</p>")


def _widget(name: str, label: str, value: Any) -> Any:
    elem_id = f"setting_{name}"
    if name in CHOICES:
        return gr.Dropdown(CHOICES[name], value=value, label=label, elem_id=elem_id, allow_custom_value=True)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, label=label, elem_id=elem_id)
    if isinstance(value, int):
        return gr.Number(value=value, precision=0, label=label, elem_id=elem_id, minimum=-1 if name in DERIVED else 0)
    if isinstance(value, float):
        return gr.Number(value=value, label=label, elem_id=elem_id, minimum=0, step=0.05)
    # paths and names need room: a narrow box wraps them over several lines
    return gr.Textbox(value=str(value), label=label, elem_id=elem_id, lines=1, max_lines=1, min_width=320)


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        if value is None or float(value) != int(float(value)):
            raise StudioError(f"Setting '{name}' must be a whole number, got {value!r}.", field=name)
        return int(float(value))
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise StudioError(f"Setting '{name}' must be a number, got {value!r}.", field=name) from None
    return "" if value is None else str(value).strip()


def _save(studio: Any, values: dict) -> tuple[str, str]:
    live = studio.settings
    try:
        changes = {n: _coerce(n, v, getattr(live, n)) for n, v in values.items()}
        changes = {n: v for n, v in changes.items() if v != getattr(live, n)}
        live.replace(**changes)  # validates the combination before anything is written or applied
        # the file keeps what the user saved before plus these changes, not this run's command-line flags
        stored, _ = Settings.load(live.data_dir)
        path = stored.replace(**changes).save()
    except (StudioError, OSError) as exc:
        return error_html(f"Not saved: {exc}"), _status(studio)
    if not changes:
        return f"<p class='studio-note'>Nothing changed; {html.escape(str(path))} is up to date.</p>", _status(studio)
    applied = _apply(studio, {n: v for n, v in changes.items() if n not in RESTART})
    restart = sorted(set(changes) & RESTART)
    parts = [f"Saved to {html.escape(str(path))}."]
    if applied:
        parts.append(f"Applied now: {', '.join(applied)}.")
    if restart:
        parts.append(f"<b>Restart the studio</b> for: {', '.join(restart)}.")
    if set(changes) & RELOAD:
        parts.append("Reload the page to see the new slider ranges.")
    return "<p class='studio-note'>" + " ".join(parts) + "</p>", _status(studio)


def _apply(studio: Any, changes: dict) -> list[str]:
    """Write live-applicable values into the shared Settings object every engine part reads from."""
    for name, value in changes.items():
        setattr(studio.settings, name, value)
    if "outdir" in changes and hasattr(studio, "outputs"):
        studio.outputs.outdir = Path(studio.settings.outdir)
    if FOLDERS & set(changes):
        studio.registry.refresh()
    return sorted(changes)


def _status(studio: Any) -> str:
    try:
        st = studio.manager.stats()
    except Exception:  # noqa: BLE001 - the status line must never break the tab
        return ""
    mb = 1024 ** 2
    loaded = ", ".join(e["label"] for e in st.get("entries", [])) or "none"
    extras = "".join(f" · {x['label']}: {x['bytes'] // 1024 ** 2} MB" for x in st.get("extras", []))
    current = getattr(studio.manager, "current", None)
    return (f"**Running on** `{st['device']}` in `{st['dtype']}` · current checkpoint: "
            f"`{current.title if current else 'none loaded yet'}` · cached models: {loaded} · "
            f"RAM cache {st['ram_used'] // mb} / {st['ram_budget'] // mb} MB · "
            f"device cache {st['device_used'] // mb} / {st['device_budget'] // mb} MB{extras}")

