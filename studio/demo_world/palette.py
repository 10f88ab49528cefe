"""The world's vocabulary: colour names with their sRGB values, shapes, sizes, positions, textures."""
from __future__ import annotations

# Saturated, well separated colours: every pair is far apart in Lab, so a blurred or noisy picture still names
# its colours; the scorer names any pixel by the nearest of these.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (215, 35, 35)),
    ("green", (35, 160, 60)),
    ("blue", (30, 90, 230)),
    ("yellow", (245, 215, 40)),
    ("orange", (250, 140, 20)),
    ("purple", (150, 40, 165)),
    ("white", (242, 242, 242)),
    ("black", (22, 22, 22)),
)
COLOUR_NAMES: tuple[str, ...] = tuple(name for name, _ in COLOURS)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
HELD_OUT_SHAPES: tuple[str, ...] = ("heart",)
ALL_SHAPES: tuple[str, ...] = SHAPES + HELD_OUT_SHAPES

TEXTURES: tuple[str, ...] = ("plain",)
HELD_OUT_TEXTURES: tuple[str, ...] = ("striped",)
ALL_TEXTURES: tuple[str, ...] = TEXTURES + HELD_OUT_TEXTURES

HELD_OUT: tuple[str, ...] = HELD_OUT_SHAPES + HELD_OUT_TEXTURES

# The object's largest side as a fraction of the picture's shorter side.
SIZES: tuple[tuple[str, float], ...] = (("small", 0.26), ("medium", 0.40), ("large", 0.58))
SIZE_NAMES: tuple[str, ...] = tuple(name for name, _ in SIZES)

# (name, column, row) with -1 / 0 / 1 for left / centre / right and top / centre / bottom.
POSITIONS: tuple[tuple[str, int, int], ...] = (
    ("centre", 0, 0), ("top left", -1, -1), ("top", 0, -1), ("top right", 1, -1), ("left", -1, 0),
    ("right", 1, 0), ("bottom left", -1, 1), ("bottom", 0, 1), ("bottom right", 1, 1),
)
POSITION_NAMES: tuple[str, ...] = tuple(name for name, _, _ in POSITIONS)


def rgb(name: str) -> tuple[int, int, int]:
    """The sRGB value of a colour name."""
    for colour, value in COLOURS:
        if colour == name:
            return value
    raise KeyError(name)


def stripe_colour(colour: str, background: str) -> str:
    """The second colour of a striped object: the first of white / black / yellow that is neither its colour nor
    the background, so the stripes never merge into either."""
    return next(c for c in ("white", "black", "yellow") if c not in (colour, background))


def position_name(col: int, row: int) -> str:
    for name, c, r in POSITIONS:
        if (c, r) == (col, row):
            return name
    raise KeyError((col, row))


def position_grid(name: str) -> tuple[int, int]:
    for pos, c, r in POSITIONS:
        if pos == name:
            return c, r
    raise KeyError(name)
