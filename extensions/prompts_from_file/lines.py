"""Per-line options of A1111's "Prompts from file or textbox" script, without any UI.

A line that starts with ``--`` is a list of options (shell quoting: ``--prompt "a, b" --steps 20``); any other
line is just the prompt. Empty lines and lines starting with ``#`` are skipped.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Callable

from studio.extension_api import GenerationRequest, GenerationResult, StudioError


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


# option -> (GenerationRequest field, type); A1111's names plus a few of this studio's
OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int), "subseed": ("subseed", int), "subseed_strength": ("subseed_strength", float),
    "steps": ("steps", int), "cfg_scale": ("cfg_scale", float), "sampler_name": ("sampler_name", str),
    "scheduler": ("scheduler", str), "width": ("width", int), "height": ("height", int),
    "batch_size": ("batch_size", int), "n_iter": ("n_iter", int), "clip_skip": ("clip_skip", int),
    "checkpoint": ("checkpoint", str), "sd_model": ("checkpoint", str), "vae": ("vae", str),
    "denoising_strength": ("denoising_strength", float), "enable_hr": ("enable_hr", _bool),
    "hr_scale": ("hr_scale", float), "hr_upscaler": ("hr_upscaler", str),
}
# A1111 options that mean "do not save": accepted, mapped to save_images
NO_SAVE = ("do_not_save_samples",)


def parse_line(line: str) -> dict:
    """Request fields of one line; StudioError naming the bad option."""
    text = line.strip()
    if not text.startswith("--"):
        return {"prompt": text}
    try:
        args = shlex.split(text)
    except ValueError as exc:
        raise StudioError(f"cannot split the line: {exc} (unbalanced quotes?)") from None
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise StudioError(f"expected an option like --steps, got {arg!r}")
        name = arg[2:]
        if name in NO_SAVE:
            out["save_images"] = False
            i += 1
            continue
        if name not in OPTIONS:
            raise StudioError(f"unknown option --{name}", fix=f"use one of: --{', --'.join(OPTIONS)}")
        if i + 1 >= len(args):
            raise StudioError(f"--{name} needs a value")
        field_name, kind = OPTIONS[name]
        try:
            out[field_name] = kind(args[i + 1])
        except ValueError:
            raise StudioError(f"--{name} {args[i + 1]!r} is not a valid {kind.__name__}") from None
        i += 2
    return out


@dataclass
class LineResult:
    number: int                 # 1-based line number in the text
    text: str
    result: GenerationResult | None = None
    error: str = ""
    images: list = field(default_factory=list)


def jobs(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate((text or "").splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def run_line(api: Any, base: GenerationRequest, number: int, line: str) -> LineResult:
    """Run one line; its error (bad option, bad value, failed job) is kept on the result, never raised."""
    out = LineResult(number, line)
    try:
        fields = parse_line(line)
        out.result = api.generate(base.replace(**fields))
        out.images = list(out.result.images)
    except Exception as exc:  # noqa: BLE001 - one bad line must not stop the others
        out.error = str(exc)
    return out


def run_all(api: Any, base: GenerationRequest, text: str) -> list[LineResult]:
    return [run_line(api, base, n, line) for n, line in jobs(text)]
