"""One TOML file describes a training run: ``TrainConfig`` reads, validates and writes it.

The file has sections (``[model]``, ``[dataset]``, ...) so it reads well; in Python the config is flat so a form
(the Train tab) can map its widgets by field name. Errors name the field as ``section.field``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import StudioError

METHODS = ("lora", "locon", "loha", "lokr", "dreambooth_lora", "textual_inversion", "controlnet")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion8bit", "Prodigy", "Adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
PRECISIONS = ("auto", "no", "fp16", "bf16")
CHECKPOINTING = ("auto", "on", "off")
CACHE_MODES = ("none", "ram", "disk")
PREDICTIONS = ("auto", "epsilon", "v_prediction")
UNET_TARGETS = ("transformer", "attention")
TIMESTEP_SAMPLINGS = ("shift", "sigmoid", "uniform")


@dataclass
class TrainConfig:
    """Everything one run needs. Empty paths are derived (see ``resolved``)."""

    # [model]
    base_model: str = ""                  # .safetensors/.ckpt single file or a diffusers folder
    prediction: str = "auto"              # auto: what the loader decides (sidecar yaml); v_prediction trains on v
    clip_skip: int = 1
    models_dir: str = ""                  # A1111 models/ root (class-image generation); "" = checkpoint's grandparent
    # [method]
    method: str = "lora"
    # [dataset]
    dataset_dir: str = ""
    resolution: int = 512
    enable_buckets: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_step: int = 64
    min_image_side: int = 64              # smaller images are skipped (listed in the report)
    repeats: int = 1                      # for images not in an ``N_name`` sub-folder
    flip: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0                  # first N comma-separated tags stay in place when shuffling
    caption_dropout: float = 0.0          # probability of training a step with an empty caption
    caption_extension: str = ".txt"
    cache_latents: str = "ram"            # none | ram | disk
    # [network]
    rank: int = 8
    alpha: float = 4.0
    conv_rank: int = 0                    # > 0 with locon/loha/lokr adds the 3x3 convs
    conv_alpha: float = 1.0
    train_unet: bool = True
    train_text_encoder: bool = False
    unet_targets: str = "transformer"     # transformer: attention + feed-forward + proj_in/out (kohya); attention
    network_weights: str = ""             # refine: a LoRA / LyCORIS file (TI: an embedding) the run starts from
    # [optimizer]
    optimizer: str = "AdamW"
    learning_rate: float = 1e-4
    unet_lr: float = 0.0                  # 0: learning_rate
    text_encoder_lr: float = 0.0          # 0: learning_rate
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    max_grad_norm: float = 1.0
    # [training]
    epochs: int = 1
    max_steps: int = 0                    # > 0 overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    gradient_checkpointing: str = "auto"  # auto: on with CUDA, off on the CPU; "on" / "off" (true / false read too)
    mixed_precision: str = "auto"         # auto: bf16 where the card has it, else fp16; "no" (fp32) on the CPU
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    seed: int = 42
    # [sampling]
    sample_prompts: str = ""              # kohya prompt file; or the prompts themselves, one per line
    sample_every: int = 0                 # steps; 0: off
    sample_at_start: bool = True
    sample_steps: int = 20
    # [output]
    output_name: str = "my_lora"
    output_dir: str = ""                  # "" -> models/Lora (or models/embeddings for TI) under models_dir
    run_dir: str = ""                     # state, samples, progress; "" -> <output_dir>/../../data/training/<name>
    save_every: int = 0                   # steps; intermediate saves get a step suffix
    resume: bool = False                  # continue from the last saved state in run_dir
    # [dreambooth]
    instance_prompt: str = ""             # e.g. "sks dog": used when an image has no caption
    class_prompt: str = ""
    class_images_dir: str = ""
    num_class_images: int = 0
    prior_loss_weight: float = 1.0
    # [textual_inversion]
    token: str = ""
    init_word: str = "*"
    num_vectors: int = 1
    # [controlnet]
    conditioning: str = "canny"           # a preprocessor's name, or "folder": pairs in conditioning/ beside images
    controlnet_init: str = ""             # a ControlNet to go on training ("" = a copy of the base UNet's encoder)
    # [flow] flow-matching families (FLUX): kohya sd-scripts' options and its recommended values
    timestep_sampling: str = "shift"      # shift: sigmoid of a normal draw, shifted; sigmoid: unshifted; uniform
    discrete_flow_shift: float = 3.1582   # the shift of "shift" sampling
    guidance_scale: float = 1.0           # the distilled-guidance input while training (FLUX dev)

    def __post_init__(self):
        if isinstance(self.gradient_checkpointing, bool):     # the option was a bool before "auto"
            self.gradient_checkpointing = "on" if self.gradient_checkpointing else "off"

    # ---- derived values ------------------------------------------------------------------------------------
    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing on (after ``for_device`` resolved "auto")."""
        return self.gradient_checkpointing == "on"

    def for_device(self, cuda: bool) -> "TrainConfig":
        """A copy with the "auto" precision and checkpointing chosen for the device: on CUDA bf16 where the card
        computes it natively (Ampere and later), else fp16, with gradient checkpointing (an SDXL LoRA in fp32
        without it does not fit 24 GB); on the CPU fp32 without checkpointing. Explicit values stay."""
        c = dataclasses.replace(self)
        if c.mixed_precision == "auto":
            c.mixed_precision = ("bf16" if _native_bf16() else "fp16") if cuda else "no"
        if c.gradient_checkpointing == "auto":
            c.gradient_checkpointing = "on" if cuda else "off"
        return c

    @property
    def is_ti(self) -> bool:
        return self.method == "textual_inversion"

    @property
    def is_controlnet(self) -> bool:
        return self.method == "controlnet"

    @property
    def output_kind(self) -> str:
        """The models/ sub-folder the result goes to."""
        return "embeddings" if self.is_ti else "ControlNet" if self.is_controlnet else "Lora"

    @property
    def network_module(self) -> str:
        return {"loha": "lycoris.kohya", "lokr": "lycoris.kohya"}.get(self.method, "networks.lora")

    def resolved(self) -> "TrainConfig":
        """A copy with every derived path filled in (absolute)."""
        c = dataclasses.replace(self)
        base = Path(c.base_model).expanduser()
        if not c.models_dir:
            c.models_dir = str(base.resolve().parent.parent)
        if not c.output_dir:
            c.output_dir = str(Path(c.models_dir) / c.output_kind)
        if not c.run_dir:
            c.run_dir = str(Path(c.models_dir).parent / "data" / "training" / c.output_name)
        for name in PATH_FIELDS:
            if getattr(c, name):
                setattr(c, name, str(Path(getattr(c, name)).expanduser().resolve()))
        return c

    def lr_for(self, part: str) -> float:
        lr = {"unet": self.unet_lr, "text_encoder": self.text_encoder_lr}.get(part, 0.0)
        return lr or self.learning_rate

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self, *, check_files: bool = True) -> "TrainConfig":
        def bad(name: str, message: str, fix: str) -> StudioError:
            return StudioError(message, field=f"{SECTION_OF[name]}.{name}", fix=fix)

        choices = {"method": METHODS, "optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS,
                   "mixed_precision": PRECISIONS, "gradient_checkpointing": CHECKPOINTING, "cache_latents": CACHE_MODES,
                   "prediction": PREDICTIONS, "unet_targets": UNET_TARGETS,
                   "timestep_sampling": TIMESTEP_SAMPLINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"{name} is {getattr(self, name)!r}.", f"use one of {', '.join(allowed)}")
        positive = ("resolution", "bucket_step", "batch_size", "grad_accum", "epochs", "rank", "sample_steps",
                    "num_vectors", "lr_num_cycles", "min_bucket_reso", "max_bucket_reso", "repeats")
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, f"{name} must be at least 1 (got {getattr(self, name)}).", "set a positive number")
        for name in ("max_steps", "sample_every", "save_every", "conv_rank", "lr_warmup_steps", "keep_tokens",
                     "min_snr_gamma", "noise_offset", "num_class_images", "weight_decay", "max_grad_norm",
                     "min_image_side", "alpha", "conv_alpha", "unet_lr", "text_encoder_lr", "prior_loss_weight",
                     "guidance_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
                raise bad(name, f"{name} must be 0 or more (got {value!r}).", "set 0 or a positive number")
        if not self.discrete_flow_shift > 0:
            raise bad("discrete_flow_shift", f"discrete_flow_shift must be above 0 (got {self.discrete_flow_shift}).",
                      "e.g. 3.1582 (kohya's FLUX value); 1 is no shift")
        if not self.learning_rate > 0:
            raise bad("learning_rate", f"learning_rate must be above 0 (got {self.learning_rate}).", "e.g. 1e-4")
        if not 0 <= self.caption_dropout < 1:
            raise bad("caption_dropout", "caption_dropout must be in [0, 1).", "e.g. 0.05")
        if self.resolution % 8 or self.bucket_step % 8:
            raise bad("resolution", "resolution and bucket_step must be multiples of 8.", "e.g. 512 and 64")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise bad("min_bucket_reso", "min_bucket_reso is above max_bucket_reso.", "swap them")
        if not self.output_name or any(ch in self.output_name for ch in '/\\:*?"<>|') or self.output_name[0] == ".":
            raise bad("output_name", f"output_name {self.output_name!r} is not a usable file name.",
                      "use letters, digits, '-' and '_'")
        if self.method in ("lora", "locon", "loha", "lokr", "dreambooth_lora") and not (
                self.train_unet or self.train_text_encoder):
            raise bad("train_unet", "Neither the UNet nor the text encoder is trained.", "enable train_unet")
        if self.is_ti:
            if not self.token or " " in self.token.strip() or self.token != self.token.strip():
                raise bad("token", f"token {self.token!r} must be one word.", "e.g. token = \"my-style\"")
            if not self.init_word.strip():
                raise bad("init_word", "init_word is empty.", "give a word close to the concept, e.g. 'dog'")
        if self.method == "dreambooth_lora":
            if not self.class_prompt.strip():
                raise bad("class_prompt", "DreamBooth needs a class prompt.", "e.g. class_prompt = \"a dog\"")
            if not self.class_images_dir:
                raise bad("class_images_dir", "DreamBooth needs a class images folder.",
                          "name a folder; missing images are generated there")
        if self.is_controlnet and not self.conditioning.strip():
            raise bad("conditioning", "A ControlNet run needs its conditions.",
                      "name a preprocessor (e.g. canny) or 'folder' for pairs in conditioning/ beside the images")
        if self.optimizer in ("AdamW8bit", "Lion8bit"):
            if not _has_bnb_cuda():
                raise bad("optimizer", f"{self.optimizer} needs bitsandbytes and a CUDA device.",
                          "use AdamW or Adafactor")
        if self.optimizer == "Prodigy" and not _importable("prodigyopt"):
            raise bad("optimizer", "Prodigy needs the prodigyopt package.", "pip install prodigyopt, or use AdamW")
        if self.mixed_precision == "fp16" and not _cuda():
            raise bad("mixed_precision", "fp16 mixed precision needs a CUDA device.", "use 'no' or 'bf16'")
        if self.mixed_precision == "bf16" and _cuda() and not _native_bf16():
            raise bad("mixed_precision", "This GPU has no bf16 (it needs an RTX 30xx / A100 or newer).",
                      "use 'fp16' or 'auto'")
        if check_files:
            if not self.base_model or not Path(self.base_model).exists():
                raise bad("base_model", f"Base model {self.base_model!r} not found.",
                          "give the path of a checkpoint file or diffusers folder")
            if not self.dataset_dir or not Path(self.dataset_dir).is_dir():
                raise bad("dataset_dir", f"Dataset folder {self.dataset_dir!r} not found.",
                          "give the folder with the training images")
            if self.network_weights and not Path(self.network_weights).is_file():
                raise bad("network_weights", f"Weights {self.network_weights!r} to refine not found.",
                          "give a LoRA / LyCORIS file (an embedding for Textual Inversion), or leave it empty")
            if self.controlnet_init and not Path(self.controlnet_init).exists():
                raise bad("controlnet_init", f"ControlNet {self.controlnet_init!r} not found.",
                          "give a ControlNet file or folder, or leave it empty to start from the base UNet")
        return self

    # ---- TOML ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Accepts sectioned (as in the TOML file) or flat dicts; unknown keys are an error (typos matter)."""
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict) and key in SECTIONS:
                flat.update(value)
            else:
                flat[key] = value
        known = {f.name: f for f in fields(cls)}
        defaults = cls()
        out = {}
        for key, value in flat.items():
            if key not in known:
                raise StudioError(f"Unknown config key {key!r}.", field=key,
                                  fix=f"remove it; known keys: {', '.join(sorted(known))}")
            want = type(getattr(defaults, key))
            if key == "gradient_checkpointing" and isinstance(value, bool):
                value = "on" if value else "off"           # configs written before "auto"
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise StudioError(f"{key} should be {want.__name__}, got {value!r}.",
                                  field=f"{SECTION_OF[key]}.{key}", fix=f"write a {want.__name__}")
            out[key] = value
        return cls(**out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise StudioError(f"Config file {path} not found.", path=str(path), fix="check the path") from None
        except tomllib.TOMLDecodeError as exc:
            raise StudioError(f"Config file {path} is not valid TOML: {exc}.", path=str(path),
                              fix="fix the syntax") from None
        return cls.from_dict(data)

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, names in SECTIONS.items():
            lines.append(f"[{section}]")
            lines += [f"{n} = {_toml_value(getattr(self, n))}" for n in names]
            lines.append("")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        from .atomic import write_text
        return write_text(path, self.to_toml())


SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("base_model", "prediction", "clip_skip", "models_dir"),
    "method": ("method",),
    "dataset": ("dataset_dir", "resolution", "enable_buckets", "min_bucket_reso", "max_bucket_reso", "bucket_step",
                "min_image_side", "repeats", "flip", "shuffle_caption", "keep_tokens", "caption_dropout",
                "caption_extension", "cache_latents"),
    "network": ("rank", "alpha", "conv_rank", "conv_alpha", "train_unet", "train_text_encoder", "unet_targets",
                "network_weights"),
    "optimizer": ("optimizer", "learning_rate", "unet_lr", "text_encoder_lr", "weight_decay", "lr_scheduler",
                  "lr_warmup_steps", "lr_num_cycles", "max_grad_norm"),
    "training": ("epochs", "max_steps", "batch_size", "grad_accum", "gradient_checkpointing", "mixed_precision",
                 "min_snr_gamma", "noise_offset", "seed"),
    "sampling": ("sample_prompts", "sample_every", "sample_at_start", "sample_steps"),
    "output": ("output_name", "output_dir", "run_dir", "save_every", "resume"),
    "dreambooth": ("instance_prompt", "class_prompt", "class_images_dir", "num_class_images", "prior_loss_weight"),
    "textual_inversion": ("token", "init_word", "num_vectors"),
    "controlnet": ("conditioning", "controlnet_init"),
    "flow": ("timestep_sampling", "discrete_flow_shift", "guidance_scale"),
}
# fields naming a file or folder: made absolute by ``resolved``, confined to the studio's folders for requests
PATH_FIELDS = ("base_model", "models_dir", "output_dir", "run_dir", "dataset_dir", "class_images_dir",
               "controlnet_init", "network_weights")
SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}
assert set(SECTION_OF) == {f.name for f in fields(TrainConfig)}, "every field belongs to one section"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # a JSON string is a valid TOML basic string (same escapes for quotes, backslashes, control characters)
    return json.dumps(str(value), ensure_ascii=False)


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _native_bf16() -> bool:
    """The CUDA card computes bf16 itself (compute capability 8.0+); torch's default also says yes for cards
    that only emulate it, slowly."""
    import torch
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:   # torch before 2.3 has no emulation flag (and answers for the native case)
        return torch.cuda.is_bf16_supported()


def _has_bnb_cuda() -> bool:
    return _cuda() and _importable("bitsandbytes")
