"""Train tab, the form: one widget per ``TrainConfig`` field (elem id ``train_<field>``), read back by name.

The Method and Training sections live here; the Dataset section (``webui.train_dataset``) adds its fields to
the same dict, so one list of names maps widgets to config fields for Start, Save config and Load config.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.training.config import (CACHE_MODES, CHECKPOINTING, OPTIMIZERS, PRECISIONS, PREDICTIONS, SCHEDULERS,
                                    SECTION_OF, TIMESTEP_SAMPLINGS, UNET_TARGETS, TrainConfig)
from webui.common import checkpoint_titles, current_checkpoint_title
from webui.model_lists import model_list
from webui.generation import HIDDEN

METHODS = (("LoRA", "lora"), ("LoCon", "locon"), ("LoHa", "loha"), ("LoKr", "lokr"),
           ("DreamBooth-LoRA", "dreambooth_lora"), ("Textual Inversion", "textual_inversion"),
           ("ControlNet", "controlnet"))
METHOD_HELP = MappingProxyType({
    "lora": "Low-rank adapters on attention and feed-forward layers (kohya `networks.lora`).",
    "locon": "LoRA plus the 3×3 convolutions (set a conv rank).",
    "loha": "LyCORIS LoHa: Hadamard product of two low-rank pairs (peft).",
    "lokr": "LyCORIS LoKr: Kronecker-product adapters (peft).",
    "dreambooth_lora": "LoRA with prior preservation: class images (generated when fewer than asked) keep the "
                       "class from drifting.",
    "textual_inversion": "A new token in the text encoder; only its embedding vectors are trained.",
    "controlnet": "A ControlNet (a trained copy of the UNet's encoder) that follows a condition image: maps made "
                  "from every training image by a preprocessor, or your own pairs in a `conditioning/` folder beside "
                  "the images (same file names). Saved to models/ControlNet in the lllyasviel layout.",
})
PAIRED = ("paired images (conditioning/ folder)", "folder")
SAMPLE_HELP = "a photo of shp --n blurry --w 512 --h 512 --d 1 --l 7 --s 20"


def _num(name: str, label: str, f: dict, *, info: str | None = None, integer: bool | None = None, **kw) -> None:
    value = getattr(TrainConfig(), name)
    integer = isinstance(value, int) if integer is None else integer
    f[name] = gr.Number(value, label=label, precision=0 if integer else None, info=info, elem_id=f"train_{name}",
                        min_width=120, **kw)


def _check(name: str, label: str, f: dict, **kw) -> None:
    f[name] = gr.Checkbox(getattr(TrainConfig(), name), label=label, elem_id=f"train_{name}", **kw)


def _drop(name: str, label: str, choices, f: dict, **kw) -> None:
    f[name] = gr.Dropdown(list(choices), value=getattr(TrainConfig(), name), label=label, elem_id=f"train_{name}",
                          min_width=140, **kw)


def _text(name: str, label: str, f: dict, **kw) -> None:
    f[name] = gr.Textbox(getattr(TrainConfig(), name), label=label, elem_id=f"train_{name}", **kw)


def method_section(f: dict, studio: Any = None) -> dict:
    """Method picker and the fields of each method (the groups show for the methods that use them)."""
    groups: dict[str, Any] = {}
    f["method"] = gr.Radio(list(METHODS), value="lora", label="Method", elem_id="train_method")
    help_md = gr.Markdown(METHOD_HELP["lora"], elem_id="train_method_help")
    with gr.Group(visible=True) as groups["network"]:
        with gr.Row():
            f["rank"] = gr.Slider(1, 128, value=TrainConfig().rank, step=1, label="Rank (dim)",
                                  elem_id="train_rank")
            _num("alpha", "Alpha", f, info="scale = alpha / rank")
            _drop("unet_targets", "UNet layers", UNET_TARGETS, f)
        with gr.Row():
            f["conv_rank"] = gr.Slider(0, 64, value=0, step=1, label="Conv rank (LoCon / LoHa / LoKr; 0: off)",
                                       elem_id="train_conv_rank")
            _num("conv_alpha", "Conv alpha", f)
        with gr.Row():
            _check("train_unet", "Train UNet", f)
            _check("train_text_encoder", "Train text encoder", f)
            _num("unet_lr", "UNet LR", f, info="0: learning rate")
            _num("text_encoder_lr", "Text encoder LR", f, info="0: learning rate")
    with gr.Group(visible=False) as groups["dreambooth"]:
        with gr.Row():
            _text("instance_prompt", "Instance prompt", f, placeholder="a photo of sks dog (used for images "
                                                                       "without a caption)")
            _text("class_prompt", "Class prompt", f, placeholder="a photo of a dog")
        with gr.Row():
            _text("class_images_dir", "Class images folder", f, scale=2,
                  placeholder="missing images are generated here by the studio")
            _num("num_class_images", "Class images", f)
            _num("prior_loss_weight", "Prior loss weight", f)
    with gr.Group(visible=False) as groups["ti"]:
        with gr.Row():
            _text("token", "Token", f, placeholder="my-style")
            _text("init_word", "Initializer word", f)
            _num("num_vectors", "Vectors per token", f)
    with gr.Group(visible=False) as groups["controlnet"]:
        with gr.Row():
            names = studio.preprocessors.names() if studio is not None else [TrainConfig().conditioning]
            f["conditioning"] = gr.Dropdown([PAIRED] + [n for n in names if n != "none"],
                                            value=TrainConfig().conditioning, label="Condition",
                                            info="the preprocessor that makes each image's map, or your pairs",
                                            elem_id="train_conditioning", scale=2)
            titles = studio.controlnets.titles() if studio is not None else []
            f["controlnet_init"] = model_list(gr.Dropdown(
                ["None", *titles], value="None", allow_custom_value=True, label="Start from",
                info="None: a copy of the base UNet; or a ControlNet of models/ControlNet to train further",
                elem_id="train_controlnet_init", scale=2), "controlnet")

    with gr.Group(visible=True) as groups["refine"]:
        _text("network_weights", "Refine from (empty: start new)", f,
              placeholder="a LoRA name of models/Lora (an embedding for TI) or a file path: the run starts from "
                          "its weights; Refine in the Run panel fills it")

    def show(method: str):
        ti, cn = method == "textual_inversion", method == "controlnet"
        return (METHOD_HELP.get(method, ""), gr.update(visible=not ti and not cn),
                gr.update(visible=method == "dreambooth_lora"), gr.update(visible=ti), gr.update(visible=cn),
                gr.update(visible=not cn))

    f["method"].change(show, f["method"], [help_md, groups["network"], groups["dreambooth"], groups["ti"],
                                           groups["controlnet"], groups["refine"]], **HIDDEN)
    return groups


def training_section(studio: Any, f: dict) -> None:
    """Base model, optimizer and schedule, length, precision, sampling and output fields."""
    with gr.Row():
        f["base_model"] = model_list(gr.Dropdown(checkpoint_titles(studio), value=current_checkpoint_title(studio),
                                                 label="Base checkpoint (a title from the list, or a file path)",
                                                 allow_custom_value=True, scale=3, elem_id="train_base_model"),
                                     "checkpoint")
        _drop("prediction", "Prediction", PREDICTIONS, f, scale=1)
        _num("clip_skip", "Clip skip", f, scale=1)
    with gr.Row():
        _drop("optimizer", "Optimizer", OPTIMIZERS, f)
        _num("learning_rate", "Learning rate", f)
        _drop("lr_scheduler", "LR scheduler", SCHEDULERS, f)
        _num("lr_warmup_steps", "Warmup steps", f)
    with gr.Row():
        _num("epochs", "Epochs", f)
        _num("max_steps", "Max steps", f, info="> 0 overrides epochs")
        _num("batch_size", "Batch size", f)
        _num("grad_accum", "Grad accumulation", f)
    with gr.Row():
        _drop("mixed_precision", "Mixed precision", PRECISIONS, f)
        _drop("cache_latents", "Latent caching", CACHE_MODES, f)
        _num("min_snr_gamma", "Min-SNR gamma", f, info="0: off; 5 is common")
        _num("noise_offset", "Noise offset", f)
    with gr.Row():
        _num("seed", "Seed", f)
        _drop("gradient_checkpointing", "Gradient checkpointing", CHECKPOINTING, f,
              info="auto: on with a GPU (less memory, slower steps), off on the CPU")
    with gr.Accordion("More optimizer options", open=False, elem_id="train_more_optimizer"):
        with gr.Row():
            _num("weight_decay", "Weight decay", f)
            _num("max_grad_norm", "Max grad norm", f)
            _num("lr_num_cycles", "LR cycles (cosine with restarts)", f)
    with gr.Accordion("Flow-matching models (kohya's options; other models ignore them)", open=False,
                      elem_id="train_flow"):
        with gr.Row():
            _drop("timestep_sampling", "Timestep sampling", TIMESTEP_SAMPLINGS, f)
            _num("discrete_flow_shift", "Discrete flow shift", f, info="kohya's FLUX value: 3.1582")
            _num("guidance_scale", "Guidance input", f, info="the distilled-guidance value trained at (1.0)")
    _text("sample_prompts", "Sample prompts (kohya format, one per line; or a prompt file path)", f, lines=3,
          placeholder=SAMPLE_HELP)
    with gr.Row():
        _num("sample_every", "Sample every N steps", f, info="0: off")
        _num("sample_steps", "Sample steps (default --s)", f)
        _check("sample_at_start", "Also sample at step 0", f)
    with gr.Row():
        _text("output_name", "Output name", f, scale=2)
        _num("save_every", "Save every N steps", f, info="0: only at the end")
    with gr.Accordion("Paths (empty: the studio's folders)", open=False, elem_id="train_paths"):
        _text("output_dir", "Output folder", f,
              placeholder="models/Lora (models/embeddings for TI, models/ControlNet for ControlNet)")
        _text("run_dir", "Run folder (state, samples, log)", f, placeholder="data/training/<output name>")
        _text("models_dir", "Models root (class-image generation)", f, placeholder="the studio's models folder")
    # the list is re-read when it is opened (a checkpoint merged or dropped in meanwhile shows up); the choices
    # are only sent when they changed, so an open list is not re-rendered under the pointer
    shown = gr.State(checkpoint_titles(studio))
    f["base_model"].focus(lambda old: _refresh_models(studio, old), shown, [f["base_model"], shown], **HIDDEN)


def _refresh_models(studio: Any, old: list[str]):
    studio.registry.refresh()
    titles = checkpoint_titles(studio)
    return (gr.update(), old) if titles == old else (gr.update(choices=titles), titles)


# ---- widget values <-> config ------------------------------------------------------------------------------
def label_of(f: dict, field: str | None) -> str:
    """``section.key`` -> the widget's label (for error messages); unknown names stay as they are."""
    if not field:
        return ""
    name = field.rsplit(".", 1)[-1]
    comp = f.get(name)
    label = getattr(comp, "label", None)
    qualified = f"{SECTION_OF[name]}.{name}" if name in SECTION_OF else field
    return f"{label} ({qualified})" if label else qualified


def to_config_dict(names: list[str], values: tuple) -> dict:
    """Widget values -> a flat ``TrainConfig`` dict with the right types (numbers arrive as floats or None)."""
    defaults = TrainConfig()
    out: dict[str, Any] = {}
    for name, value in zip(names, values):
        want = type(getattr(defaults, name))
        if want is bool:
            out[name] = bool(value)
        elif want is str:
            out[name] = "" if value is None else str(value).strip() if name != "sample_prompts" else str(value)
        else:
            if value is None or value == "":
                raise StudioError(f"{name} is empty.", field=f"{SECTION_OF[name]}.{name}", fix="enter a number")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise StudioError(f"{name} is not a number ({value!r}).", field=f"{SECTION_OF[name]}.{name}",
                                  fix="enter a number") from None
            if want is int:
                if not number.is_integer():
                    raise StudioError(f"{name} must be a whole number (got {value}).",
                                      field=f"{SECTION_OF[name]}.{name}", fix="enter a whole number")
                number = int(number)
            out[name] = number
    return out


def config_updates(studio: Any, names: list[str], cfg: TrainConfig) -> list:
    """A config (e.g. read from a TOML file) -> one value per widget; the base model path shows as its title."""
    values = dataclasses.asdict(cfg)
    values["base_model"] = checkpoint_title_for(studio, cfg.base_model)
    values["controlnet_init"] = values["controlnet_init"] or "None"
    return [values[n] for n in names]


def checkpoint_title_for(studio: Any, base_model: str) -> str:
    """The registry title of a checkpoint path (a run.toml stores absolute paths); the path when not listed."""
    if not base_model:
        return base_model
    try:
        target = Path(base_model).expanduser().resolve()
    except OSError:
        return base_model
    for info in studio.registry.checkpoints():
        if info.kind != "hub" and Path(info.path).resolve() == target:
            return info.title
    return base_model
