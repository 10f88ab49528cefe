"""Base64 images in and out of the API (shared by txt2img, img2img, png-info, progress and ControlNet)."""
from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING, Any

from ..errors import StudioError
from ..images import DEFAULT_MAX_PIXELS, open_image
from ..infotext import png_text

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image


def encode_png(image: "Image", infotext: str | None = None) -> str:
    """Base64 PNG; with ``infotext`` it carries the A1111 "parameters" chunk."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_text(infotext) if infotext else None, compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: Any, field: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> "Image":
    """A base64 image (a data: URL prefix is allowed) -> PIL image; 422 naming ``field`` when it is not one or is
    over ``max_pixels`` (checked from the header, so a decompression bomb is refused before it is decoded).

    URLs and file paths are refused: the studio never fetches or opens anything a request names.
    """
    return decode_file(data, field, max_pixels)[1]


def decode_file(data: Any, field: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, "Image"]:
    """(the file's bytes as sent, the image) for a base64 image, checked as ``decode_image`` does."""
    if not isinstance(data, str) or not data.strip():
        raise StudioError(f"'{field}' must be a base64-encoded image.", field=field)
    text = data.strip()
    if text.startswith(("http://", "https://")):
        raise StudioError(f"'{field}' is a URL; the studio does not download images.", field=field,
                          fix="send the image itself, base64-encoded")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())   # line-wrapped base64 (e.g. from the base64 tool) is fine
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise StudioError(f"'{field}' is not valid base64.", field=field,
                          fix="send the file's bytes base64-encoded (standard alphabet)") from None
    return raw, open_image(raw, field=field, max_pixels=max_pixels)
