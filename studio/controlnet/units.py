"""ControlNet units with the A1111 extension's field names, their API form, infotext, and the control image."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from PIL import Image

from ..errors import StudioError
from .preprocessors import Preprocessors, pixel_perfect_resolution

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Scale to Fit (Inner Fit)": "Crop and Resize",
                  "Outer Fit (Shrink to Fit)": "Resize and Fill", "Envelope (Outer Fit)": "Resize and Fill",
                  "Just Resize (Latent upscale)": "Just Resize"}
# infotext keys in the extension's order ("Resize Mode" is field_to_displaytext("resize_mode"))
INFOTEXT_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                   "guidance_start", "guidance_end", "pixel_perfect", "control_mode")


def _enum(value: Any, names: tuple[str, ...], aliases: Mapping[str, str], field_name: str) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if value == 3 and names is RESIZE_MODES:  # A1111's "Just Resize (Latent upscale)"
            return names[0]
        if 0 <= value < len(names):
            return names[value]
    elif isinstance(value, str):
        text = aliases.get(value.strip(), value.strip())
        if text.isdigit():
            return _enum(int(text), names, aliases, field_name)
        for name in names:
            if text.lower() == name.lower():
                return name
    raise StudioError(f"{field_name} is {value!r}.", field=field_name,
                      fix="use one of " + ", ".join(f'"{n}" ({i})' for i, n in enumerate(names)))


def _number(value: Any, field_name: str, lo: float | None = None, hi: float | None = None) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{field_name} must be a number, got {value!r}.", field=field_name) from None
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        raise StudioError(f"{field_name} is {number:g}, outside {lo:g}..{hi:g}.", field=field_name,
                          fix=f"use a value from {lo:g} to {hi:g}")
    return number


def _bool(value: Any, field_name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise StudioError(f"{field_name} must be true or false, got {value!r}.", field=field_name)


@dataclass
class ControlUnit:
    """One ControlNet unit (the extension's ``ControlNetUnit`` fields)."""

    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Image.Image | None = None
    mask: Image.Image | None = None            # optional: where this unit acts (white = full effect)
    resize_mode: str = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = 512                   # -1: the preprocessor's default
    threshold_a: float = -1                    # -1: the preprocessor's default
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    save_detected_map: bool = True
    index: int = field(default=0, repr=False, compare=False)   # position in the request (error messages)

    def f(self, name: str) -> str:
        return f"controlnet.units[{self.index}].{name}"

    @property
    def resize_mode_index(self) -> int:
        return RESIZE_MODES.index(self.resize_mode)

    @property
    def control_mode_index(self) -> int:
        return CONTROL_MODES.index(self.control_mode)

    def validate(self, preprocessors: Preprocessors | None = None) -> "ControlUnit":
        """Normalise enums and check ranges; raises StudioError naming ``controlnet.units[i].<field>``."""
        self.enabled = _bool(self.enabled, self.f("enabled"))
        self.low_vram = _bool(self.low_vram, self.f("low_vram"))
        self.pixel_perfect = _bool(self.pixel_perfect, self.f("pixel_perfect"))
        self.save_detected_map = _bool(self.save_detected_map, self.f("save_detected_map"))
        self.resize_mode = _enum(self.resize_mode, RESIZE_MODES, RESIZE_ALIASES, self.f("resize_mode"))
        self.control_mode = _enum(self.control_mode, CONTROL_MODES, {}, self.f("control_mode"))
        for name in ("processor_res", "threshold_a", "threshold_b"):  # null from JSON means "default"
            if getattr(self, name) is None:
                setattr(self, name, -1)
        self.weight = _number(self.weight, self.f("weight"), 0.0, 2.0)
        self.processor_res = int(_number(self.processor_res, self.f("processor_res"), -1, 4096))
        self.threshold_a = _number(self.threshold_a, self.f("threshold_a"))
        self.threshold_b = _number(self.threshold_b, self.f("threshold_b"))
        self.guidance_start = _number(self.guidance_start, self.f("guidance_start"), 0.0, 1.0)
        self.guidance_end = _number(self.guidance_end, self.f("guidance_end"), 0.0, 1.0)
        if self.guidance_start >= self.guidance_end:
            raise StudioError(f"{self.f('guidance_start')} ({self.guidance_start:g}) must be below guidance_end "
                              f"({self.guidance_end:g}).", field=self.f("guidance_start"),
                              fix="e.g. guidance_start 0 and guidance_end 1 for the whole run")
        if not isinstance(self.module, str) or not isinstance(self.model, str):
            raise StudioError("module and model must be strings.", field=self.f("module"))
        self.module = self.module.strip() or "none"
        if preprocessors is not None:
            self.module = preprocessors.get(self.module, field=self.f("module")).name
        for name in ("image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Image.Image):
                from ..images import open_image
                setattr(self, name, open_image(value, field=self.f(name)))
        return self

    @classmethod
    def from_api(cls, data: Mapping[str, Any] | "ControlUnit", index: int = 0,
                 preprocessors: Preprocessors | None = None) -> "ControlUnit":
        """A unit from an ``alwayson_scripts.controlnet.args`` entry (unknown keys are ignored, as there)."""
        if isinstance(data, ControlUnit):
            return dataclasses.replace(data, index=index).validate(preprocessors)
        if not isinstance(data, Mapping):
            raise StudioError(f"controlnet.units[{index}] must be an object, got {type(data).__name__}.",
                              field=f"controlnet.units[{index}]")
        d = dict(data)
        if d.get("image") is None and d.get("input_image") is not None:  # older API name
            d["image"] = d["input_image"]
        if d.get("mask") is None and d.get("mask_image") is not None:    # Forge / newer alias
            d["mask"] = d["mask_image"]
        image = d.get("image")
        if isinstance(image, Mapping):                                    # {"image": ..., "mask": ...}
            d["image"], d["mask"] = image.get("image"), d.get("mask") or image.get("mask")
        elif isinstance(image, (list, tuple)) and len(image) == 2 and not isinstance(image[0], (int, float)):
            d["image"], d["mask"] = image
        names = {f.name for f in dataclasses.fields(cls)} - {"index"}
        unit = cls(**{k: v for k, v in d.items() if k in names}, index=index)
        if isinstance(unit.mask, str) and not unit.mask:
            unit.mask = None
        if isinstance(unit.image, str) and not unit.image:
            unit.image = None
        return unit.validate(preprocessors)

    # ---- infotext ------------------------------------------------------------------------------
    def infotext(self) -> str:
        """The extension's unit string: ``Module: canny, Model: ..., Weight: 1, ...`` (-1 values left out)."""
        parts = []
        for name in INFOTEXT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == -1:
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            text = str(value)
            if "," in text or ":" in text:   # would break the format; the extension drops such units too
                continue
            parts.append(f"{' '.join(w.capitalize() for w in name.split('_'))}: {text}")
        return ", ".join(parts)

    @classmethod
    def parse_infotext(cls, text: str, index: int = 0) -> "ControlUnit":
        """Inverse of ``infotext`` (also reads the extension's extra keys such as Low Vram)."""
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1].replace('\\"', '"')
        values: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"index", "image", "mask", "enabled"}
        for item in text.split(","):
            if ": " not in item:
                continue
            key, raw = item.strip().split(": ", 1)
            name = "_".join(w.lower() for w in key.split(" "))
            if name in names:
                values[name] = _parse_value(raw.strip())
        return cls(enabled=True, index=index, **values).validate()


def _parse_value(raw: str) -> Any:
    if raw in ("True", "False"):
        return raw == "True"
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def infotext_params(units: list[ControlUnit]) -> dict[str, str]:
    """``{"ControlNet 0": "Module: ...", ...}`` for the enabled units (numbered by position, as the extension)."""
    return {f"ControlNet {i}": u.infotext() for i, u in enumerate(units) if u.enabled}


def units_from_params(params: Mapping[str, Any]) -> list[ControlUnit]:
    """Units back from parsed infotext parameters (keys ``ControlNet N``)."""
    found = []
    for key, value in params.items():
        parts = key.split(" ")
        if len(parts) == 2 and parts[0] == "ControlNet" and parts[1].isdigit() and isinstance(value, str):
            found.append((int(parts[1]), value))
    return [ControlUnit.parse_infotext(v, index=i) for i, v in sorted(found)]


# ---- control image ---------------------------------------------------------------------------------

@dataclass
class PreparedControl:
    image: Image.Image          # the control image at W x H, what the ControlNet sees
    detected_map: Image.Image   # the preprocessor's output (saved beside outputs / shown as preview)
    resolution: int             # the resolution the preprocessor ran at


def prepare_control_image(unit: ControlUnit, width: int, height: int, preprocessors: Preprocessors,
                          annotators_dir=None, fallback_image: Image.Image | None = None) -> PreparedControl:
    """Preprocess the unit's image (or ``fallback_image``, e.g. the img2img input) and fit it to W x H by the
    unit's resize mode. Preprocessing is cached by the registry (same image + settings -> no rerun)."""
    from ..images import resize_image, to_rgb

    image = unit.image if unit.image is not None else fallback_image
    if image is None:
        raise StudioError(f"ControlNet unit {unit.index} is enabled but has no input image.", field=unit.f("image"),
                          fix="upload an image for the unit (or use the img2img image), or disable the unit")
    image = to_rgb(image)
    mode = unit.resize_mode_index
    resolution = pixel_perfect_resolution(image.size, width, height, mode) if unit.pixel_perfect \
        else unit.processor_res
    detected = preprocessors.run(unit.module, image, resolution, annotators_dir=annotators_dir,
                                 threshold_a=unit.threshold_a, threshold_b=unit.threshold_b)
    used_res = preprocessors.resolve(unit.module, resolution)[0]
    control = detected if detected.size == (width, height) else resize_image(detected, width, height, mode)
    return PreparedControl(control, detected, used_res)
