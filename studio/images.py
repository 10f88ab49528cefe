"""Opening user images safely, and A1111's resize modes."""
from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import StudioError

DEFAULT_MAX_PIXELS = 4096 * 4096


def open_image(source: Any, *, field: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A PIL image from a PIL image, bytes, a path or a base64 string (with or without a data: prefix).

    The size is checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, str) and not os.path.exists(source):
            text = source.split(",", 1)[1] if source.startswith("data:") else source
            try:
                source = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise StudioError(f"'{field}' is neither a readable file nor valid base64 image data.",
                                  field=field, fix="send the image as base64-encoded PNG/JPEG bytes") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:  # PIL raises SyntaxError for some malformed headers
            name = source if isinstance(source, (str, os.PathLike)) else "the data"
            raise StudioError(f"'{field}': {name} is not an image this studio can read ({exc}).", field=field,
                              fix="use a PNG, JPEG or WEBP file") from None
    w, h = image.size
    if w * h > max_pixels:
        raise StudioError(f"'{field}' is {w}x{h} pixels, over the limit of {max_pixels} pixels.", field=field,
                          fix="downscale the image first (or raise max_image_pixels in Settings)")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise StudioError(f"'{field}' could not be decoded ({exc}); the file may be truncated.", field=field) from None
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas over white rather than black (what a user expects from a cut-out PNG)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's resize modes: 0/3 just resize, 1 crop and resize, 2 resize and fill (edges stretched)."""
    if mode in (0, 3):
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:  # cover the target, crop the overflow centred
        scale = width / image.width if ratio > src_ratio else height / image.height
        resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                               Image.LANCZOS)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        return resized.crop((left, top, left + width, top + height))
    # mode 2: fit inside, then fill the bands by stretching the image's own edge rows / columns
    scale = width / image.width if ratio < src_ratio else height / image.height
    fw, fh = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((fw, fh), Image.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - fw) // 2, (height - fh) // 2
    canvas.paste(resized, (left, top))
    if fw < width:
        if left > 0:
            canvas.paste(resized.crop((0, 0, 1, fh)).resize((left, fh)), (0, top))
        if width - left - fw > 0:
            canvas.paste(resized.crop((fw - 1, 0, fw, fh)).resize((width - left - fw, fh)), (left + fw, top))
    if fh < height:
        if top > 0:
            canvas.paste(resized.crop((0, 0, fw, 1)).resize((fw, top)), (left, 0))
        if height - top - fh > 0:
            canvas.paste(resized.crop((0, fh - 1, fw, fh)).resize((fw, height - top - fh)), (left, top + fh))
    return canvas


def image_to_base64(image: Image.Image, pnginfo: Any = None) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buf.getvalue()).decode("ascii")
