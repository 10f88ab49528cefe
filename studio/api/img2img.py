"""POST /sdapi/v1/img2img bodies -> GenerationRequest (img2img, or inpaint when a mask is sent)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StudioError
from ..request import GenerationRequest
from .convert import common_fields, value
from .imagedata import decode_image
from .models import Img2ImgRequest

if TYPE_CHECKING:  # pragma: no cover
    from ..app import Studio
    from .options import OptionsStore


def img2img_request(body: Img2ImgRequest, studio: "Studio",
                    options: "OptionsStore") -> tuple[GenerationRequest, list[str]]:
    """Build the GenerationRequest for an img2img body. Returns (request, notes about ignored fields).

    Images are decoded here, in the request, so a broken or oversized one is a 422 naming ``init_images`` or
    ``mask`` before the job is queued."""
    notes: list[str] = []
    fields, get = common_fields(body, studio, options, notes)
    max_pixels = studio.settings.max_image_pixels
    sources = body.init_images or []
    if not isinstance(sources, list) or not sources:
        raise StudioError("img2img needs at least one image in init_images.", field="init_images",
                          fix="send init_images: [<base64 PNG or JPEG>]")
    init_images = tuple(decode_image(data, "init_images", max_pixels) for data in sources)
    mask = decode_image(body.mask, "mask", max_pixels) if body.mask else None
    return GenerationRequest(
        **fields, mode="inpaint" if mask is not None else "img2img", init_images=init_images, mask=mask,
        resize_mode=get("resize_mode"), denoising_strength=get("denoising_strength"),
        mask_blur=_mask_blur(get("mask_blur"), body, notes), inpainting_fill=get("inpainting_fill"),
        inpaint_full_res=bool(get("inpaint_full_res")), inpaint_full_res_padding=get("inpaint_full_res_padding"),
        inpainting_mask_invert=get("inpainting_mask_invert"),
    ), notes


def _mask_blur(blur: int | None, body: Img2ImgRequest, notes: list[str]) -> int:
    """A1111: ``mask_blur`` sets both mask_blur_x and mask_blur_y; the studio blurs the same in both directions,
    so differing x / y use the larger one (noted)."""
    if blur is not None:
        return blur
    x, y = value(body, "mask_blur_x"), value(body, "mask_blur_y")
    if x != y:
        notes.append(f"mask_blur_x {x} and mask_blur_y {y} differ; the studio blurs by {max(x, y)} in both "
                     "directions")
    return max(x, y)
