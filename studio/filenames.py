"""A1111's image file name patterns (Settings › "File name pattern"): ``[seed]-[prompt_words]`` and friends.

Same tags and rules as A1111's ``modules/images.py`` FilenameGenerator: tags are case-insensitive, take
``<arg>`` suffixes (``[datetime<%Y%m%d><Asia/Tokyo>]``), an unknown tag stays as written, a tag with nothing to
say (``[batch_number]`` of a one-image batch) also drops the text just before it, and each value is cleaned of
characters that are not allowed in file names and cut to 128 characters. The file keeps its ``00000-`` counter.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import re
import string
import zoneinfo
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

INVALID_CHARS = '<>:"/\\|?*\n\r\t'
MAX_PART_LENGTH = 128          # A1111's --filename-max-length default
MAX_PROMPT_WORDS = 8           # A1111's directories_max_prompt_words default
DEFAULT_TIME_FORMAT = "%Y%m%d%H%M%S"
DEFAULT_PATTERN = "[seed]"
_PATTERN = re.compile(r"(.*?)(?:\[([^\[\]]+)\]|$)", re.DOTALL)
_PATTERN_ARG = re.compile(r"(.*)<([^>]*)>$", re.DOTALL)
_NON_LETTERS = re.compile(r"[\s" + re.escape(string.punctuation) + r"]+")
SKIP = object()                # "nothing here": the tag and the text before it are left out


def sanitize_part(text: Any, replace_spaces: bool = True) -> str | None:
    """A1111's sanitize_filename_part: no path or reserved characters, no leading space, no trailing space or
    dot, at most MAX_PART_LENGTH characters."""
    if text is None:
        return None
    text = str(text)
    if replace_spaces:
        text = text.replace(" ", "_")
    text = text.translate({ord(c): "_" for c in INVALID_CHARS})
    return text.lstrip(" ")[:MAX_PART_LENGTH].rstrip(" .")


@dataclass
class NameContext:
    """What one saved image's name may use. ``index`` is the image's place in the whole job (0-based)."""

    seed: int | None = None
    prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str = ""
    scheduler: str = ""
    model_name: str = ""
    model_hash: str = ""
    job_timestamp: str = ""
    index: int = 0
    batch_size: int = 1
    n_iter: int = 1
    all_seeds: list[int] = field(default_factory=list)
    denoising: float | None = None     # img2img strength, or the hires pass's; None for plain txt2img
    clip_skip: int | None = None
    now: datetime.datetime | None = None

    @classmethod
    def from_request(cls, request: Any, *, seed: int, image: Any, index: int, all_seeds: list[int],
                     sampler: str, scheduler: str, model_name: str, model_hash: str,
                     job_timestamp: str) -> "NameContext":
        if request.mode in ("img2img", "inpaint"):
            denoising = request.denoising_strength
        else:   # A1111's txt2img sends a denoising strength only with hires fix
            denoising = request.hr_denoising_strength if request.enable_hr else None
        return cls(seed=seed, prompt=request.prompt, width=image.width, height=image.height, steps=request.steps,
                   cfg_scale=request.cfg_scale, sampler=sampler, scheduler=scheduler, model_name=model_name,
                   model_hash=model_hash, job_timestamp=job_timestamp, index=index,
                   batch_size=request.batch_size, n_iter=request.n_iter, all_seeds=list(all_seeds),
                   denoising=denoising, clip_skip=request.clip_skip)

    # ---- tag values ------------------------------------------------------------------------------------------
    def _now(self) -> datetime.datetime:
        return self.now or datetime.datetime.now()

    def datetime_text(self, fmt: str = "", zone: str | None = None) -> str:
        """[datetime], [datetime<Format>], [datetime<Format><Time Zone>]; a bad format or zone falls back to the
        default format / local time, as in A1111."""
        tz = None
        if zone:
            try:
                tz = zoneinfo.ZoneInfo(zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                tz = None
        moment = self._now().astimezone(tz)
        try:
            text = moment.strftime(fmt or DEFAULT_TIME_FORMAT)
        except (ValueError, TypeError):
            text = moment.strftime(DEFAULT_TIME_FORMAT)
        return sanitize_part(text, replace_spaces=False)

    def prompt_words(self) -> str:
        words = [w for w in _NON_LETTERS.split(self.prompt or "") if w] or ["empty"]
        return sanitize_part(" ".join(words[:MAX_PROMPT_WORDS]), replace_spaces=False)

    def batch_number(self) -> Any:
        return SKIP if self.batch_size == 1 else self.index % self.batch_size + 1

    def generation_number(self) -> Any:
        return SKIP if self.n_iter == 1 and self.batch_size == 1 else self.index + 1

    def seed_first(self) -> Any:
        return self.seed if self.batch_size == 1 or not self.all_seeds else self.all_seeds[0]

    def seed_last(self) -> Any:
        return SKIP if self.batch_size == 1 or not self.all_seeds else self.all_seeds[-1]


def _model_name(c: NameContext) -> str:
    return sanitize_part(c.model_name.replace("\\", "/").rsplit("/", 1)[-1], replace_spaces=False)


TAGS: dict[str, Callable[..., Any]] = {
    "seed": lambda c: c.seed if c.seed is not None else "",
    "seed_first": NameContext.seed_first,
    "seed_last": NameContext.seed_last,
    "steps": lambda c: c.steps,
    "cfg": lambda c: c.cfg_scale,
    "width": lambda c: c.width,
    "height": lambda c: c.height,
    "sampler": lambda c: sanitize_part(c.sampler, replace_spaces=False),
    "scheduler": lambda c: sanitize_part(c.scheduler, replace_spaces=False),
    "model_name": _model_name,
    "model_hash": lambda c: c.model_hash,
    "date": lambda c: c._now().strftime("%Y-%m-%d"),
    "datetime": NameContext.datetime_text,
    "job_timestamp": lambda c: c.job_timestamp,
    "prompt_hash": lambda c: hashlib.sha256((c.prompt or "").encode()).hexdigest()[:8],
    "prompt": lambda c: sanitize_part(c.prompt),
    "prompt_no_styles": lambda c: sanitize_part(c.prompt, replace_spaces=False),   # the studio has no styles
    "prompt_spaces": lambda c: sanitize_part(c.prompt, replace_spaces=False),
    "prompt_words": NameContext.prompt_words,
    "batch_number": NameContext.batch_number,
    "batch_size": lambda c: c.batch_size,
    "generation_number": NameContext.generation_number,
    "denoising": lambda c: c.denoising if c.denoising else SKIP,
    "clip_skip": lambda c: c.clip_skip,
    "none": lambda c: "",      # just the counter
}


def apply_pattern(pattern: str, context: NameContext) -> str:
    """Replace the tags of ``pattern`` (A1111's FilenameGenerator.apply)."""
    out = ""
    for m in _PATTERN.finditer(pattern):
        text, tag = m.groups()
        if tag is None:
            out += text
            continue
        args: list[str] = []
        name = tag
        while (arg := _PATTERN_ARG.match(name)) is not None:
            name, value = arg.groups()
            args.insert(0, value)
        fn = TAGS.get(name.lower())
        if fn is not None:
            try:
                value = fn(context, *args)
            except Exception:  # noqa: BLE001 - a bad tag must never cost the image
                log.exception("File name tag [%s] failed", tag)
                value = None
            if value is SKIP:
                continue
            if value is not None:
                out += text + str(value)
                continue
        out += f"{text}[{tag}]"
    return out


def file_stem(number: int, pattern: str | None, context: NameContext | None, max_length: int = 255) -> str:
    """``00012-<pattern applied>`` (``00012`` alone when the pattern gives nothing), safe as one file name and
    short enough for the file system with a 4-character extension."""
    decoration = apply_pattern("-" + (pattern or DEFAULT_PATTERN), context or NameContext())
    decoration = decoration.translate({ord(c): "_" for c in INVALID_CHARS})
    stem = f"{number:05d}" + ("" if decoration == "-" else decoration)
    return stem[:max_length - 4].rstrip(" ")
