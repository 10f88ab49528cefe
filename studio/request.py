"""GenerationRequest and GenerationResult: the one shape every caller (UI, API, extensions) uses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import StudioError

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

    from .settings import Settings

MODES = ("txt2img",)


@dataclass(frozen=True)
class GenerationRequest:
    """What to make. Field names follow A1111's API where it has one (``n_iter`` = batch count)."""

    prompt: str = ""
    negative_prompt: str = ""
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    clip_skip: int = 1
    checkpoint: str = ""            # title, file name, stem or short hash; "" = the loaded / default one
    vae: str = "Automatic"          # "Automatic" (sidecar or the checkpoint's own), "None", or a VAE file name
    mode: str = "txt2img"
    save_images: bool = True
    extra_infotext: tuple[tuple[str, str], ...] = ()   # extra "Key: value" pairs for the infotext

    def replace(self, **changes: Any) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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

        for name in ("prompt", "negative_prompt", "sampler_name", "scheduler", "checkpoint", "vae"):
            if not isinstance(getattr(self, name), str):
                raise StudioError(f"'{name}' must be text, got {type(getattr(self, name)).__name__}.", field=name)
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
        for name, lo, hi in (("cfg_scale", 0.0, 30.0), ("subseed_strength", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise StudioError(f"'{name}' is {value!r}; it must be a number from {lo} to {hi}.", field=name)
        return self


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
    job_id: str = ""
    job_timestamp: str = ""
