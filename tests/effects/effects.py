"""Helpers of the effect tests: requests in the eval's settings, world pictures, masks, pixel colour names."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from studio.demo import TRAINED_NAME
from studio.demo_world import score
from studio.demo_world.palette import COLOUR_NAMES
from studio.demo_world.scorer import _lab, _nearest, _palette_lab   # the scorer's own colour naming, per pixel
from studio.request import GenerationRequest

SIZE = 64   # the demo model's native size


def request(prompt: str, seed: int, **kw) -> GenerationRequest:
    """A request in the eval's settings (20 steps, DPM++ 2M Karras, CFG 7, 64 px), not saved."""
    fields = dict(prompt=prompt, seed=seed, steps=20, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=7.0,
                  width=SIZE, height=SIZE, checkpoint=TRAINED_NAME, save_images=False)
    fields.update(kw)
    return GenerationRequest(**fields)


def draw(studio, prompt: str, seeds: list[int], **kw) -> list[Image.Image]:
    """One image per seed, drawn as batches of up to 8 (image i of a batch has seed + i, as in A1111)."""
    images = []
    for i in range(0, len(seeds), 8):
        chunk = seeds[i:i + 8]
        assert chunk == list(range(chunk[0], chunk[0] + len(chunk))), "seeds of one batch must be consecutive"
        result = studio.generate(request(prompt, chunk[0], batch_size=len(chunk), **kw))
        assert result.seeds == chunk
        images += result.images
    return images


def colour_shares(image: Image.Image, where: np.ndarray | None = None) -> dict[str, float]:
    """Share of the pixels (all, or those where ``where`` is True) nearest to each palette colour."""
    lab = _lab(np.asarray(image.convert("RGB"), np.float32) / 255.0).reshape(-1, 3)
    if where is not None:
        lab = lab[where.reshape(-1)]
    names = np.bincount(_nearest(lab, _palette_lab()), minlength=len(COLOUR_NAMES)) / max(1, len(lab))
    return {name: float(v) for name, v in zip(COLOUR_NAMES, names)}


def box_mask(box, size=(SIZE, SIZE)) -> Image.Image:
    """A white rectangle (x0, y0, x1, y1; x1, y1 exclusive) on black: the area to inpaint."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


def grow(box, by: int, size: int):
    return max(0, box[0] - by), max(0, box[1] - by), min(size, box[2] + by), min(size, box[3] + by)


def out_of_reach(mask: Image.Image, blur: int) -> np.ndarray:
    """Pixels the blurred mask cannot touch (PIL's Gaussian reaches about 3 radii): they must stay exact."""
    reach = 3 * blur + 1
    return np.asarray(mask.filter(ImageFilter.MaxFilter(2 * reach + 1))) == 0


def other_colour(*taken: str, order=("yellow", "red", "white")) -> str:
    """A prompt colour that differs from the picture's own (these three are far from each other in Lab)."""
    return next(c for c in order if c not in taken)


def save_grid(name: str, rows: list[list[Image.Image]]) -> None:
    """With EFFECTS_SHOTS=<folder>, save the pictures as effects-<name>.png to look at (rows of equal size)."""
    folder = os.environ.get("EFFECTS_SHOTS")
    if not folder:
        return
    side = max(im.height for row in rows for im in row)
    width = max(sum(im.width * side // im.height for im in row) for row in rows)
    sheet = Image.new("RGB", (width, side * len(rows)), (128, 128, 128))
    for r, row in enumerate(rows):
        x = 0
        for im in row:
            im = im.convert("RGB").resize((im.width * side // im.height, side), Image.NEAREST)
            sheet.paste(im, (x, r * side))
            x += im.width
    Path(folder).mkdir(parents=True, exist_ok=True)
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(Path(folder) / f"effects-{name}.png")


__all__ = ["SIZE", "request", "draw", "score", "colour_shares", "box_mask", "grow", "out_of_reach",
           "other_colour", "save_grid"]
