"""GenerationRequest and GenerationResult: the one shape every caller (UI, API, extensions) uses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import StudioError

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from .settings import Settings

MODES = ("txt2img", "img2img", "inpaint")
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
RNG_SOURCES = ("", "CPU", "GPU")   # "GPU": drawn on the generation device (the same as CPU on a CPU device)
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


@dataclass(frozen=True)
class GenerationRequest:
    """What to make. Field names follow A1111's API where it has one (``n_iter`` = batch count)."""

    prompt: str = ""
    negative_prompt: str = ""
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = 3.5  # Forge's name: the guidance input of guidance-distilled models (FLUX dev)
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    clip_skip: int = 1
    rng: str = ""                    # noise source (A1111 randn_source): "" = the studio's setting, "CPU", "GPU"
    checkpoint: str = ""            # title, file name, stem or short hash; "" = the loaded / default one
    vae: str = "Automatic"          # "Automatic" (sidecar or the checkpoint's own), "None", or a VAE file name
    mode: str = "txt2img"
    save_images: bool = True
    extra_infotext: tuple[tuple[str, str], ...] = ()   # extra "Key: value" pairs for the infotext
    # img2img / inpaint (A1111 names; images are PIL images)
    init_images: tuple = ()
    mask: Any = None                 # PIL "L"/RGB(A) image: white = change (before inpainting_mask_invert)
    resize_mode: int = 0             # index into RESIZE_MODES
    denoising_strength: float = 0.75
    mask_blur: int = 4
    inpainting_fill: int = 1         # index into MASKED_CONTENT (UI default "original"; A1111's API sends 0)
    inpaint_full_res: bool = False   # inpaint area: False = whole picture, True = only masked
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = 0  # 1 = inpaint what is NOT masked
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0    # 0 = same as steps
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_denoising_strength: float = 0.7
    hr_sampler_name: str = ""        # "" = same as the first pass
    hr_scheduler: str = ""
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    # ControlNet units (studio.controlnet.ControlUnit, A1111 extension field names)
    controlnet_units: tuple = ()

    def replace(self, **changes: Any) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain fields only (images are left out: they are not JSON)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("init_images", "mask", "controlnet_units")}

    @property
    def hr_size(self) -> tuple[int, int]:
        """Final size of a hires-fix job: hr_resize_x/y when set, else width/height × hr_scale (multiples of 8)."""
        if self.hr_resize_x or self.hr_resize_y:
            w = self.hr_resize_x or round(self.width * self.hr_resize_y / self.height)
            h = self.hr_resize_y or round(self.height * self.hr_resize_x / self.width)
        else:
            w, h = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        return w // 8 * 8, h // 8 * 8

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationRequest":
        """Build from a dict by field name (unknown keys are an error naming them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise StudioError(f"Unknown request field(s): {', '.join(unknown)}.", field=unknown[0],
                              fix=f"use only: {', '.join(sorted(names))}")
        data = dict(data)
        if "extra_infotext" in data:
            data["extra_infotext"] = tuple(tuple(p) for p in data["extra_infotext"])
        if "init_images" in data:
            data["init_images"] = tuple(data["init_images"] or ())
        return cls(**data)

    def validate(self, settings: "Settings | None" = None) -> "GenerationRequest":
        """Raise StudioError naming the first bad field; return self when all is well."""
        max_w = settings.max_width if settings else 2048
        max_h = settings.max_height if settings else 2048
        max_steps = settings.max_steps if settings else 150
        max_bs = settings.max_batch_size if settings else 8
        max_n = settings.max_batch_count if settings else 100

        def need_int(name: str, lo: int, hi: int, extra: str = "") -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise StudioError(f"'{name}' must be a whole number, got {value!r}.", field=name)
            if not lo <= value <= hi:
                raise StudioError(f"'{name}' is {value}; it must be between {lo} and {hi}.{extra}", field=name,
                                  fix=f"set {name} to a value from {lo} to {hi}")

        for name in ("prompt", "negative_prompt", "sampler_name", "scheduler", "checkpoint", "vae", "hr_upscaler",
                     "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise StudioError(f"'{name}' must be text, got {type(getattr(self, name)).__name__}.", field=name)
            _check_unicode(getattr(self, name), name)
        for key, value in self.extra_infotext:
            _check_unicode(f"{key}{value}", "extra_infotext")
        self._check_prompts(settings)
        if self.rng not in RNG_SOURCES:
            if str(self.rng).upper() == "NV":
                raise StudioError("RNG 'NV' (A1111's emulation of NVIDIA GPU noise on the CPU) is not supported.",
                                  field="rng", fix="use 'CPU' (the same noise on every machine) or 'GPU'")
            raise StudioError(f"Unknown RNG {self.rng!r}.", field="rng", fix="use 'CPU' or 'GPU'")
        if self.mode not in MODES:
            raise StudioError(f"Unknown mode {self.mode!r}.", field="mode", fix=f"use one of {', '.join(MODES)}")
        need_int("steps", 1, max_steps)
        for name, hi in (("width", max_w), ("height", max_h)):
            need_int(name, 64, hi)
            if getattr(self, name) % 8:
                value = getattr(self, name)
                raise StudioError(f"'{name}' is {value}; it must be a multiple of 8.", field=name,
                                  fix=f"use {value - value % 8} or {value - value % 8 + 8}")
        need_int("batch_size", 1, max_bs)
        need_int("n_iter", 1, max_n)
        need_int("clip_skip", 1, 12)
        need_int("seed", -1, 2**32 - 1)
        need_int("subseed", -1, 2**32 - 1)
        need_int("resize_mode", 0, len(RESIZE_MODES) - 1)
        need_int("mask_blur", 0, 64)
        need_int("inpainting_fill", 0, len(MASKED_CONTENT) - 1)
        need_int("inpaint_full_res_padding", 0, 256)
        need_int("inpainting_mask_invert", 0, 1)
        need_int("hr_second_pass_steps", 0, max_steps)
        need_int("hr_resize_x", 0, max_w)
        need_int("hr_resize_y", 0, max_h)
        if self.mode in ("img2img", "inpaint") and not self.init_images:
            raise StudioError(f"{self.mode} needs an init image.", field="init_images",
                              fix="drop an image into the image box (or send one from a gallery)")
        if self.mode == "inpaint" and self.mask is None:
            raise StudioError("Inpaint needs a mask.", field="mask", fix="paint over the area to change")
        if self.enable_hr:
            if self.mode != "txt2img":
                raise StudioError("Hires fix is a txt2img option.", field="enable_hr")
            w, h = self.hr_size
            if not (64 <= w <= max_w and 64 <= h <= max_h):
                raise StudioError(f"Hires fix would make a {w}x{h} image; the limit is {max_w}x{max_h}.",
                                  field="hr_scale", fix="lower the upscale factor or the hires size")
        for name, lo, hi in (("cfg_scale", 0.0, 30.0), ("distilled_cfg_scale", 0.0, 30.0), ("subseed_strength", 0.0, 1.0),
                             ("denoising_strength", 0.0, 1.0), ("hr_denoising_strength", 0.0, 1.0),
                             ("hr_scale", 1.0, 8.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise StudioError(f"'{name}' is {value!r}; it must be a number from {lo} to {hi}.", field=name)
        return self

    def _check_prompts(self, settings: "Settings | None") -> None:
        """Length and chunk limits, checked before the request takes a place in the queue."""
        from .prompt_parser import count_breaks

        max_len = settings.max_prompt_length if settings else 10000
        max_chunks = settings.max_prompt_chunks if settings else 64
        for name in PROMPT_FIELDS:
            text = getattr(self, name)
            if len(text) > max_len:
                raise StudioError(f"'{name}' is {len(text)} characters long; the limit is {max_len}.", field=name,
                                  fix=f"shorten it to {max_len} characters (setting max_prompt_length)")
            chunks = count_breaks(text) + 1
            if chunks > max_chunks:
                raise StudioError(f"'{name}' has {chunks - 1} BREAKs, which make {chunks} chunks of 75 tokens; the "
                                  f"limit is {max_chunks}.", field=name,
                                  fix="use fewer BREAKs (setting max_prompt_chunks)")


PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")


def _check_unicode(text: str, name: str) -> None:
    """A lone surrogate (JSON "\\ud800") is no text: it cannot be tokenized, saved in a PNG or logged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StudioError(f"'{name}' holds {text[exc.start:exc.end]!a} at character {exc.start}, a lone "
                          "surrogate that is not valid Unicode text.", field=name,
                          fix="send the text as valid UTF-8 (surrogates only in pairs)") from None


@dataclass
class GenerationResult:
    """What a job made. Lists are per image, in order."""

    images: list["Image"] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    request: GenerationRequest | None = None
    model_name: str = ""
    model_hash: str = ""
    vae_name: str = ""
    vae_hash: str = ""
    interrupted: bool = False
    control_maps: list = field(default_factory=list)   # detected ControlNet maps, one per enabled unit
    job_id: str = ""
    job_timestamp: str = ""
