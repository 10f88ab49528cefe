"""X/Y/Z plot logic without any UI: axis value parsing (A1111's syntax), one request per cell, the grid image.

Values: ``1, 2, 3``; ranges ``1-5`` (step 1), ``1-5 (+2)`` (step), ``1-10 [5]`` (count, evenly spaced);
comma lists may quote items (``"a, b", c``). Prompt S/R: the first value is searched for in the prompt and
each value replaces it in turn (the first cell keeps the prompt as written).
"""
from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from io import StringIO
from typing import Any, Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from studio.extension_api import GenerationRequest, StudioError

_NUM = r"[+-]?\s*\d+(?:\.\d*)?"
RANGE_STEP = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\))?\s*$")
RANGE_COUNT = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*\[\s*(\d+)\s*\]\s*$")


@dataclass(frozen=True)
class AxisType:
    """``kind``: int | float | str | choice (checked against a list) | sr (prompt search/replace)."""

    label: str
    kind: str
    fields: tuple[str, ...] = ()      # GenerationRequest fields the value is written to
    choices: str = ""                 # StudioAPI method listing valid values (kind "choice")


AXIS_TYPES = {a.label: a for a in (
    AxisType("Nothing", "none"),
    AxisType("Seed", "int", ("seed",)),
    AxisType("Steps", "int", ("steps",)),
    AxisType("CFG scale", "float", ("cfg_scale",)),
    AxisType("Sampler", "choice", ("sampler_name",), "samplers"),
    AxisType("Schedule type", "choice", ("scheduler",), "schedulers"),
    AxisType("Checkpoint", "choice", ("checkpoint",), "checkpoints"),
    AxisType("Clip skip", "int", ("clip_skip",)),
    # txt2img uses the denoising strength in its hires pass; img2img in its only pass
    AxisType("Denoising", "float", ("denoising_strength", "hr_denoising_strength")),
    AxisType("Prompt S/R", "sr", ("prompt", "negative_prompt")),
)}


@dataclass(frozen=True)
class Axis:
    type: AxisType
    values: tuple

    @property
    def labels(self) -> list[str]:
        if self.type.kind == "none":
            return [""]
        if self.type.kind == "sr":
            return [str(v) for v in self.values]
        return [f"{self.type.label}: {_fmt(v)}" for v in self.values]


@dataclass(frozen=True)
class Cell:
    x: int
    y: int
    z: int
    request: GenerationRequest


def split_values(text: str) -> list[str]:
    """Comma-separated, quotes allowed (A1111 reads the box as one CSV row)."""
    rows = list(csv.reader(StringIO(text or ""), skipinitialspace=True))
    return [v.strip() for row in rows for v in row if v.strip()]


def _number(text: str, kind: str) -> float | int:
    text = text.replace(" ", "")
    return int(text) if kind == "int" else float(text)


def expand(item: str, kind: str) -> list:
    """One comma item -> its values (a range gives several)."""
    m = RANGE_COUNT.match(item)
    if m:
        start, end, count = _number(m[1], "float"), _number(m[2], "float"), int(m[3])
        if count < 1:
            raise StudioError(f"'{item}': the count in [ ] must be at least 1.")
        pts = [start + (end - start) * i / (count - 1) for i in range(count)] if count > 1 else [start]
        return [int(p) for p in pts] if kind == "int" else [round(p, 6) for p in pts]
    m = RANGE_STEP.match(item)
    if m and not (kind == "int" and ("." in m[1] or "." in m[2])):
        start, end = _number(m[1], kind), _number(m[2], kind)
        step = _number(m[3], kind) if m[3] else (1 if end >= start else -1)
        if step == 0 or (end - start) * step < 0:
            raise StudioError(f"'{item}': the step {step} never reaches {end} from {start}.")
        out, value, n = [], start, 0
        while (value <= end + 1e-9) if step > 0 else (value >= end - 1e-9):
            out.append(value if kind == "int" else round(value, 6))
            n += 1
            value = start + step * n
            if n > 10_000:
                raise StudioError(f"'{item}' gives more than 10000 values.")
        return out
    try:
        return [_number(item, kind)]
    except ValueError:
        raise StudioError(f"'{item}' is not a {'whole ' if kind == 'int' else ''}number or a range "
                          "(1-5, 1-5 (+2), 1-10 [5]).") from None


def parse_axis(label: str, text: str, choices: Callable[[str], Sequence[str]] | None = None) -> Axis:
    """Axis from its type label and values box; ``choices(method)`` lists valid samplers etc."""
    if label not in AXIS_TYPES:
        raise StudioError(f"Unknown axis type {label!r}.", fix=f"use one of {', '.join(AXIS_TYPES)}")
    axis_type = AXIS_TYPES[label]
    if axis_type.kind == "none":
        return Axis(axis_type, (None,))
    items = split_values(text)
    if not items:
        raise StudioError(f"The {label} axis has no values.", fix="type values such as 1, 2, 3 or 1-5")
    if axis_type.kind in ("int", "float"):
        values = [v for item in items for v in expand(item, axis_type.kind)]
    elif axis_type.kind == "choice" and choices is not None:
        known = list(choices(axis_type.choices))
        values = [_match_choice(label, item, known) for item in items]
    else:
        values = items
    return Axis(axis_type, tuple(values))


def _match_choice(label: str, item: str, known: Sequence[str]) -> str:
    lowered = item.lower()
    exact = [k for k in known if k.lower() == lowered]
    if exact:
        return exact[0]
    partial = [k for k in known if lowered in k.lower()]   # "tiny-sd1" finds "tiny-sd1.safetensors [abc]"
    if len(partial) == 1:
        return partial[0]
    raise StudioError(f"{label} {item!r} is not known.", fix=f"use one of: {', '.join(known)}")


def apply(axis: Axis, request: GenerationRequest, value: Any) -> GenerationRequest:
    kind = axis.type.kind
    if kind == "none":
        return request
    if kind == "sr":
        search = str(axis.values[0])
        return request.replace(prompt=request.prompt.replace(search, str(value)),
                               negative_prompt=request.negative_prompt.replace(search, str(value)))
    return request.replace(**{f: value for f in axis.type.fields})


def cell_requests(base: GenerationRequest, axes: Sequence[Axis]) -> list[Cell]:
    """Z outermost, X innermost (A1111's order). One image per cell; a random seed is fixed once so the
    cells differ only by their axis values."""
    axes = list(axes) + [Axis(AXIS_TYPES["Nothing"], (None,))] * (3 - len(axes))
    if base.seed == -1:
        base = base.replace(seed=random.randrange(2**32))
    base = base.replace(batch_size=1, n_iter=1)
    for axis in axes:
        if axis.type.kind == "sr":
            search = str(axis.values[0])
            if search not in base.prompt and search not in base.negative_prompt:
                raise StudioError(f"Prompt S/R did not find {search!r} in the prompt or negative prompt.",
                                  fix="the first Prompt S/R value must appear in the prompt")
    x, y, z = axes
    cells = []
    for iz, vz in enumerate(z.values):
        for iy, vy in enumerate(y.values):
            for ix, vx in enumerate(x.values):
                request = apply(x, apply(y, apply(z, base, vz), vy), vx)
                cells.append(Cell(ix, iy, iz, request))
    return cells


# ---- the grid image ------------------------------------------------------------------------------------
def font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def label_margins(cell_w: int, cell_h: int, x_labels: Sequence[str], y_labels: Sequence[str],
                  z_labels: Sequence[str]) -> tuple[int, int, int]:
    """(left, top, z_title) margins in pixels: 0 where an axis has no labels."""
    size = max(12, min(cell_w, cell_h) // 10)
    left = max(cell_w // 2, 4 * size) if any(y_labels) else 0
    top = size * 3 if any(x_labels) else 0
    ztitle = size * 2 if any(z_labels) else 0
    return left, top, ztitle


def draw_grid(images: Sequence[Image.Image], x_labels: Sequence[str], y_labels: Sequence[str],
              z_labels: Sequence[str] = ("",)) -> Image.Image:
    """``images`` in cell order (z, y, x). One block per Z value, side by side, each with X labels on top and
    Y labels on the left. Size = Z × (left + X·w) by z_title + top + Y·h."""
    nx, ny, nz = len(x_labels), len(y_labels), len(z_labels)
    if len(images) != nx * ny * nz:
        raise ValueError(f"{len(images)} images for a {nx}x{ny}x{nz} grid")
    w, h = images[0].size
    left, top, ztitle = label_margins(w, h, x_labels, y_labels, z_labels)
    block_w = left + nx * w
    grid = Image.new("RGB", (nz * block_w, ztitle + top + ny * h), "white")
    draw = ImageDraw.Draw(grid)
    f = font(max(12, min(w, h) // 10))
    for iz in range(nz):
        ox = iz * block_w
        if ztitle:
            _text(draw, z_labels[iz], (ox + left, 0, ox + block_w, ztitle), f)
        for iy in range(ny):
            if left:
                _text(draw, y_labels[iy], (ox, ztitle + top + iy * h, ox + left, ztitle + top + (iy + 1) * h), f)
            for ix in range(nx):
                if top and iy == 0:
                    _text(draw, x_labels[ix], (ox + left + ix * w, ztitle, ox + left + (ix + 1) * w, ztitle + top), f)
                image = images[(iz * ny + iy) * nx + ix]
                grid.paste(image.convert("RGB").resize((w, h)), (ox + left + ix * w, ztitle + top + iy * h))
    return grid


def _text(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int], f: Any) -> None:
    """Centred in ``box``, wrapped on words to its width (a word wider than the box is split)."""
    x0, y0, x1, y1 = box
    width = max(8, x1 - x0 - 4)
    lines: list[str] = []
    for word in text.split():
        line = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(line, font=f) <= width:
            lines[-1] = line
            continue
        while len(word) > 1 and draw.textlength(word, font=f) > width:
            cut = next(i for i in range(len(word), 0, -1) if i == 1 or draw.textlength(word[:i], font=f) <= width)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    bbox = draw.textbbox((0, 0), "Ag", font=f)
    line_h = bbox[3] - bbox[1] + 2
    lines = lines[:max(1, (y1 - y0) // line_h)]
    y = y0 + ((y1 - y0) - line_h * len(lines)) // 2
    for line in lines:
        draw.text((x0 + (x1 - x0 - draw.textlength(line, font=f)) / 2, y), line, fill="black", font=f)
        y += line_h


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---- running ---------------------------------------------------------------------------------------------
class Plot:
    """The cells of one plot, run one by one through ``api.generate`` (the shared queue), then the grid."""

    def __init__(self, api: Any, base: GenerationRequest, axes: Sequence[Axis]):
        self.api = api
        self.axes = list(axes) + [Axis(AXIS_TYPES["Nothing"], (None,))] * (3 - len(axes))
        self.cells = cell_requests(base, self.axes)
        self.images: list[Image.Image] = []
        self.infotexts: list[str] = []

    def run_cell(self, index: int) -> tuple[Image.Image, str]:
        result = self.api.generate(self.cells[index].request)
        if not result.images or result.interrupted:
            raise StudioError(f"The plot stopped at cell {index + 1} of {len(self.cells)} (interrupted).")
        self.images.append(result.images[0])
        self.infotexts.append(result.infotexts[0] if result.infotexts else "")
        return self.images[-1], self.infotexts[-1]

    def caption(self, index: int) -> str:
        cell = self.cells[index]
        parts = [self.axes[0].labels[cell.x], self.axes[1].labels[cell.y], self.axes[2].labels[cell.z]]
        return " · ".join(p for p in parts if p)

    def finish(self, mode: str = "txt2img") -> tuple[Image.Image, str]:
        """Draw and save the grid (with the first cell's infotext, as A1111 does). Returns (grid, path)."""
        x, y, z = self.axes
        grid = draw_grid(self.images, x.labels, y.labels, z.labels)
        return grid, self.api.save_grid(grid, mode=mode, infotext=self.infotexts[0] if self.infotexts else "")

    def run(self) -> tuple[Image.Image, str]:
        for i in range(len(self.cells)):
            self.run_cell(i)
        return self.finish()
