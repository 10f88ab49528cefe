"""Small init images and masks for img2img / inpaint tests (and the GPU check), drawn in code."""
from __future__ import annotations

from PIL import Image, ImageDraw


def picture(size: int = 64) -> Image.Image:
    """A blue square picture with a red disc in its lower right quarter."""
    img = Image.new("RGB", (size, size), (40, 120, 200))
    ImageDraw.Draw(img).ellipse((size * 15 // 32, size * 15 // 32, size * 15 // 16, size * 15 // 16),
                                fill=(200, 30, 60))
    return img


def mask(size: int = 64) -> Image.Image:
    """White (repaint) square over the upper left middle, black elsewhere."""
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((size // 4, size // 4, size * 5 // 8, size * 5 // 8), fill=255)
    return m
