"""Shape outlines in a unit box: each shape's tight bounding box is centred on the origin and its larger side is 1,
so a label's box alone fixes where and how big the shape is drawn."""
from __future__ import annotations

import math

import numpy as np

RING_HOLE = 0.55        # inner / outer radius of a ring: the hole stays open even for a small ring at 64 px
STAR_INNER = 0.45       # inner / outer radius of the five-pointed star
CROSS_ARM = 0.34        # arm width of the plus-shaped cross, as a fraction of its size


def _fit(points: np.ndarray) -> np.ndarray:
    """Scale and shift ``points`` so their bounding box is centred on 0 with its larger side 1."""
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) / (hi - lo).max()


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1) * radius


def outline(shape: str) -> np.ndarray:
    """The shape's outer outline as a closed polygon (N, 2) in unit-box coordinates, y pointing down."""
    if shape in ("circle", "ring"):
        return _regular(96) / 2
    if shape == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "triangle":
        return _fit(_regular(3))
    if shape == "star":
        outer, inner = _regular(5), _regular(5, STAR_INNER, -math.pi / 2 + math.pi / 5)
        return _fit(np.stack([outer, inner], 1).reshape(-1, 2))
    if shape == "cross":
        a, b = CROSS_ARM / 2, 0.5
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a],
                         [-b, a], [-b, -a], [-a, -a]])
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 160, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return _fit(np.stack([x, y], 1))
    raise KeyError(shape)


def hole(shape: str) -> np.ndarray | None:
    """The polygon cut out of the shape (a ring's hole), or None."""
    return _regular(96, RING_HOLE / 2) if shape == "ring" else None


def extent(shape: str) -> tuple[float, float]:
    """(width, height) of the shape's bounding box in unit-box coordinates (the larger one is 1)."""
    pts = outline(shape)
    w, h = pts.max(0) - pts.min(0)
    return float(w), float(h)
