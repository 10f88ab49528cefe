"""The demo world: a deterministic, seeded stream of flat-colour shapes on flat backgrounds, each with a caption.

``World(seed).sample(i, size)`` is a pure function of (seed, restrictions, i, size): the same index always gives
the same picture, caption and label, so training, tests and benchmarks can name their data by index instead of
storing it. Held-out concepts (the heart shape, the striped texture) appear only when asked for, so a model trained
on the default world has never seen them and training tests can teach them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import StudioError
from . import shapes as geometry
from .captions import random_caption
from .palette import (ALL_SHAPES, ALL_TEXTURES, COLOUR_NAMES, HELD_OUT, HELD_OUT_SHAPES, HELD_OUT_TEXTURES,
                      POSITION_NAMES, SHAPES, SIZE_NAMES, SIZES, TEXTURES, position_grid, rgb, stripe_colour)

MARGIN = 0.08             # gap between the object and the picture's edge, as a fraction of the side
SIZE_JITTER = 0.06        # +- relative size variation within a size name
POSITION_JITTER = 0.025   # +- shift of the object's centre, as a fraction of the side
STRIPES_ACROSS = 3.5      # stripe periods across a striped object
STRIPE_DUTY = 0.4         # share of each period in the stripe colour (the object's colour stays the majority)
HELD_OUT_TEXTURE_RATE = 0.25   # share of striped objects in a world that includes held-out concepts
MAX_SUPERSAMPLED = 2048   # the side drawn before downsampling; keeps 4x anti-aliasing cheap at large sizes


def _wh(size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, (int, np.integer)) else \
        (tuple(size) if isinstance(size, (tuple, list)) else ())
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 8 for v in pair):
        raise StudioError(f"Demo world size {size!r} is not a picture size.", field="size",
                          fix="give an int side or a (width, height) pair of at least 8 px")
    return int(pair[0]), int(pair[1])


@dataclass(frozen=True)
class Label:
    """What a world picture shows. ``box`` is (x0, y0, x1, y1) as fractions of the width and height."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    box: tuple[float, float, float, float]
    texture: str = "plain"

    def pixel_box(self, size) -> tuple[int, int, int, int]:
        """The box in pixels of a picture of ``size`` (x1, y1 exclusive)."""
        w, h = _wh(size)
        x0, y0, x1, y1 = self.box
        return (int(math.floor(x0 * w)), int(math.floor(y0 * h)), int(math.ceil(x1 * w)), int(math.ceil(y1 * h)))

    @property
    def concepts(self) -> frozenset[str]:
        """Every name this label answers to (shape, colours, size, position, texture)."""
        return frozenset((self.shape, self.colour, f"{self.background} background", self.size, self.position,
                          self.texture))

    @property
    def held_out(self) -> bool:
        return self.shape in HELD_OUT_SHAPES or self.texture in HELD_OUT_TEXTURES


class Sample(NamedTuple):
    image: Image.Image
    caption: str
    label: Label

    def array(self) -> np.ndarray:
        """The picture as an (H, W, 3) uint8 array."""
        return np.asarray(self.image)


def render(label: Label, size=64) -> Image.Image:
    """Draw ``label`` at ``size``: 4x supersampled (capped at MAX_SUPERSAMPLED) and box-downsampled, so edges are
    anti-aliased the same way at every size."""
    w, h = _wh(size)
    ss = max(1, min(4, MAX_SUPERSAMPLED // max(w, h)))
    W, H = w * ss, h * ss
    x0, y0, x1, y1 = label.box
    cx, cy = (x0 + x1) / 2 * W, (y0 + y1) / 2 * H
    side = max((x1 - x0) * W, (y1 - y0) * H)   # a shape's larger extent is 1 in its unit box

    mask = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([(cx + px * side, cy + py * side) for px, py in geometry.outline(label.shape)], fill=255)
    cut = geometry.hole(label.shape)
    if cut is not None:
        draw.polygon([(cx + px * side, cy + py * side) for px, py in cut], fill=0)

    background = Image.new("RGB", (W, H), rgb(label.background))
    fill = Image.new("RGB", (W, H), rgb(label.colour))
    if label.texture == "striped":
        yy, xx = np.mgrid[0:H, 0:W]
        period = side / STRIPES_ACROSS
        stripes = (((xx + yy) / math.sqrt(2) / period) % 1.0) < STRIPE_DUTY
        arr = np.asarray(fill).copy()
        arr[stripes] = rgb(stripe_colour(label.colour, label.background))
        fill = Image.fromarray(arr)
    image = Image.composite(fill, background, mask)
    return image.reduce(ss) if ss > 1 else image


def _allowed(name: str, value, everything: Sequence[str], default: Sequence[str]) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    values = (value,) if isinstance(value, str) else tuple(value)
    unknown = [v for v in values if v not in everything]
    if unknown or not values:
        raise StudioError(f"Demo world {name} {unknown or values!r} is not known.", field=name,
                          fix=f"use one or more of: {', '.join(everything)}")
    return values


@dataclass(frozen=True)
class World:
    """A seeded world. Each attribute argument restricts the world to one value or a tuple of values.

    Held-out concepts (``palette.HELD_OUT``) appear only with ``include_held_out=True`` or when named explicitly
    (``World(shape="heart")``, ``World.of("striped")``).
    """

    seed: int = 0
    include_held_out: bool = False
    shape: str | tuple[str, ...] | None = None
    colour: str | tuple[str, ...] | None = None
    background: str | tuple[str, ...] | None = None
    size: str | tuple[str, ...] | None = None
    position: str | tuple[str, ...] | None = None
    texture: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise StudioError(f"Demo world seed {self.seed!r} is not a seed.", field="seed", fix="use an int >= 0")
        self._choices()   # validate early: a bad name fails when the world is made, not at the first sample

    @classmethod
    def of(cls, concept: str, seed: int = 0, **restrictions) -> "World":
        """A world in which every picture shows ``concept`` (a shape, colour or texture name)."""
        if concept in ALL_SHAPES:
            return cls(seed, shape=concept, **restrictions)
        if concept in ALL_TEXTURES:
            return cls(seed, texture=concept, **restrictions)
        if concept in COLOUR_NAMES:
            return cls(seed, colour=concept, **restrictions)
        raise StudioError(f"Demo world concept {concept!r} is not known.", field="concept",
                          fix=f"use a shape ({', '.join(ALL_SHAPES)}), texture ({', '.join(ALL_TEXTURES)}) "
                              f"or colour ({', '.join(COLOUR_NAMES)})")

    def _choices(self) -> dict[str, tuple[str, ...]]:
        extra = self.include_held_out
        choices = {
            "shape": _allowed("shape", self.shape, ALL_SHAPES, ALL_SHAPES if extra else SHAPES),
            "colour": _allowed("colour", self.colour, COLOUR_NAMES, COLOUR_NAMES),
            "background": _allowed("background", self.background, COLOUR_NAMES, COLOUR_NAMES),
            "size": _allowed("size", self.size, SIZE_NAMES, SIZE_NAMES),
            "position": _allowed("position", self.position, POSITION_NAMES, POSITION_NAMES),
            "texture": _allowed("texture", self.texture, ALL_TEXTURES, TEXTURES),
        }
        if len(choices["background"]) == 1:
            # One background: objects take every other allowed colour (an object of its colour would vanish).
            choices["colour"] = tuple(c for c in choices["colour"] if c != choices["background"][0])
            if not choices["colour"]:
                raise StudioError(f"Demo world background {choices['background'][0]!r} is the only object colour "
                                  "too; the object would be invisible.", field="background",
                                  fix="pick another background or allow more object colours")
        return choices

    def label(self, index: int, size=64) -> Label:
        """The label of picture ``index`` (its box depends only on the aspect ratio of ``size``)."""
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise StudioError(f"Demo world index {index!r} is not a picture index.", field="index",
                              fix="use an int >= 0")
        w, h = _wh(size)
        c = self._choices()
        rng = np.random.default_rng((self.seed, int(index)))
        shape = c["shape"][rng.integers(len(c["shape"]))]
        colour = c["colour"][rng.integers(len(c["colour"]))]
        backgrounds = [b for b in c["background"] if b != colour]
        background = backgrounds[rng.integers(len(backgrounds))]
        if self.texture is None and self.include_held_out:
            texture = HELD_OUT_TEXTURES[0] if rng.random() < HELD_OUT_TEXTURE_RATE else TEXTURES[0]
        else:
            texture = c["texture"][rng.integers(len(c["texture"]))]
        # Stripes on a small object at 64 px would be a pixel wide and blur into one colour.
        sizes = [s for s in c["size"] if s != "small"] if texture == "striped" else []
        sizes = sizes or list(c["size"])
        size_name = sizes[rng.integers(len(sizes))]
        position = c["position"][rng.integers(len(c["position"]))]

        fraction = dict(SIZES)[size_name] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
        side = fraction * min(w, h)
        ew, eh = geometry.extent(shape)
        bw, bh = ew * side, eh * side
        col, row = position_grid(position)
        centre = []
        for k, (extent, length) in enumerate(((bw, w), (bh, h))):
            slot = (col, row)[k]
            base = length / 2 if slot == 0 else (MARGIN * length + extent / 2 if slot < 0 else
                                                  length - MARGIN * length - extent / 2)
            centre.append(base + rng.uniform(-POSITION_JITTER, POSITION_JITTER) * length)
        cx, cy = centre
        box = ((cx - bw / 2) / w, (cy - bh / 2) / h, (cx + bw / 2) / w, (cy + bh / 2) / h)
        return Label(shape, colour, background, size_name, position, tuple(float(v) for v in box), texture)

    def caption(self, index: int, size=64) -> str:
        # A stream of its own, so a caption's wording does not change the picture drawn for an index.
        return random_caption(self.label(index, size), np.random.default_rng((self.seed, int(index), 1)))

    def sample(self, index: int, size=64) -> Sample:
        label = self.label(index, size)
        return Sample(render(label, size), self.caption(index, size), label)

    def samples(self, count: int, size=64, start: int = 0) -> Iterator[Sample]:
        for i in range(start, start + count):
            yield self.sample(i, size)

    def dataset(self, count: int, size=64, start: int = 0) -> "WorldDataset":
        return WorldDataset(self, count, size, start)

    @property
    def concepts(self) -> tuple[str, ...]:
        """The held-out concepts this world can show."""
        c = self._choices()
        shown = set(c["shape"]) | set(c["texture"])
        if self.texture is None and self.include_held_out:
            shown |= set(HELD_OUT_TEXTURES)
        return tuple(x for x in HELD_OUT if x in shown)


@dataclass(frozen=True)
class WorldDataset:
    """``count`` pictures from ``start`` as a map-style dataset (``len`` and indexing; a torch DataLoader takes
    it as is, with a collate function that turns PIL images into tensors)."""

    world: World
    count: int
    size: int | tuple[int, int] = 64
    start: int = 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Sample:
        if not -self.count <= i < self.count:
            raise IndexError(i)
        return self.world.sample(self.start + (i % self.count), self.size)

    def __iter__(self) -> Iterator[Sample]:
        return self.world.samples(self.count, self.size, self.start)
