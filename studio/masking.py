"""Inpaint masks: blur, invert, the "only masked" crop region, masked-content fill, overlay and outpaint canvas.

Follows A1111's processing (modules/masking.py, processing.py): the crop box is the mask's bounding box plus
padding, grown to the output's aspect ratio; the result is pasted back through the blurred mask so pixels
outside it are exactly the original ones.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .errors import StudioError


def prepare_mask(mask: Image.Image, size: tuple[int, int], *, invert: bool, warnings: list[str]) -> Image.Image:
    """An "L" mask of ``size`` (white = change). Alpha of an RGBA mask counts as paint, as an editor layer has."""
    if mask.mode in ("RGBA", "LA"):
        alpha = np.asarray(mask.getchannel("A"))
        colour = np.asarray(mask.convert("L"))
        # an editor layer paints with alpha; an uploaded black/white mask is opaque and uses brightness
        grey = alpha if alpha.min() < 255 else colour
        mask = Image.fromarray(grey.astype(np.uint8), "L")
    else:
        mask = mask.convert("L")
    if mask.size != size:
        warnings.append(f"The mask is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}; the mask "
                        "was resized to fit.")
        mask = mask.resize(size, Image.NEAREST)
    if invert:
        mask = Image.eval(mask, lambda v: 255 - v)
    if not np.asarray(mask).any():
        raise StudioError("The mask is empty: nothing is masked, so nothing would change.", field="mask",
                          fix="paint over the area to change (or use img2img for the whole picture)")
    return mask


def blur(mask: Image.Image, radius: int) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """Bounding box of the painted area plus ``padding`` pixels, clamped to the image."""
    arr = np.asarray(mask) > 0
    ys, xs = np.nonzero(arr)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return (max(0, x1 - padding), max(0, y1 - padding), min(mask.width, x2 + padding),
            min(mask.height, y2 + padding))


def expand_to_aspect(box: tuple[int, int, int, int], width: int, height: int,
                     image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Grow ``box`` to the target aspect ``width:height`` (so the crop is not distorted), staying in the image."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    target = width / height
    if bw / bh < target:
        want = min(image_w, round(bh * target))
        x1, x2 = _grow(x1, x2, want, image_w)
        if want == image_w and round(want / target) > bh:  # hit the image width: grow height instead
            y1, y2 = _grow(y1, y2, min(image_h, round(image_w / target)), image_h)
    else:
        want = min(image_h, round(bw / target))
        y1, y2 = _grow(y1, y2, want, image_h)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    extra = want - (hi - lo)
    lo -= extra // 2
    hi += extra - extra // 2
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = max(0, lo - (hi - limit)), limit
    return lo, hi


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": masked pixels take the colours around them (normalised blurs, wide to narrow)."""
    import cv2

    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    known = (np.asarray(mask) < 128).astype(np.float32)
    if not known.any():
        return image.convert("RGB")
    out = arr * known[..., None]
    hole = known == 0
    for sigma in (128, 32, 8, 2, 1):
        weight = cv2.GaussianBlur(known, (0, 0), sigma)
        colour = cv2.GaussianBlur(arr * known[..., None], (0, 0), sigma)
        ok = hole & (weight > 1e-3)
        out[ok] = colour[ok] / weight[ok][:, None]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def overlay(original: Image.Image, result: Image.Image, soft_mask: Image.Image,
            box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Paste ``result`` (made for ``box``, or the whole image) into ``original`` through the blurred mask."""
    canvas = original.convert("RGB").copy()
    if box is not None:
        x1, y1, x2, y2 = box
        canvas.paste(result.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
    else:
        canvas = result.convert("RGB").resize(original.size, Image.LANCZOS)
    return Image.composite(canvas, original.convert("RGB"), soft_mask)


def outpaint_canvas(image: Image.Image, left: int, right: int, up: int, down: int,
                    overlap: int = 8) -> tuple[Image.Image, Image.Image]:
    """Grow the canvas; the new area is pre-filled from the edges and masked (with a little overlap)."""
    w, h = image.width + left + right, image.height + up + down
    canvas = Image.new("RGB", (w, h))
    canvas.paste(image.convert("RGB"), (left, up))
    mask = Image.new("L", (w, h), 255)
    inner = (left + (overlap if left else 0), up + (overlap if up else 0),
             left + image.width - (overlap if right else 0), up + image.height - (overlap if down else 0))
    mask.paste(0, inner)
    hard = Image.new("L", (w, h), 255)
    hard.paste(0, (left, up, left + image.width, up + image.height))
    return fill_masked(canvas, hard), mask
