"""Preparing img2img and inpaint inputs: init image sizing, masks, "only masked" crops, masked content."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from . import masking
from .images import open_image, resize_image, to_rgb
from .request import MASKED_CONTENT, RESIZE_MODES, GenerationRequest


@dataclass
class Prepared:
    """What the pipeline gets (``init``/``mask`` at W×H) and how to put the result back (``finish``)."""

    init: Image.Image                       # RGB at the request's W×H (the crop, for "only masked")
    mask: Image.Image | None = None         # "L" at W×H, white = change
    original: Image.Image | None = None     # the full init image (inpaint), for the final overlay
    soft_mask: Image.Image | None = None    # blurred full-size mask used to paste back
    box: tuple[int, int, int, int] | None = None
    latent_source: Image.Image | None = None  # resize mode 3: the image to encode at its own size
    infotext: dict = field(default_factory=dict)

    def finish(self, image: Image.Image) -> Image.Image:
        """Put a generated image back into the original (exact pixels outside the blurred mask)."""
        if self.original is None:
            return image
        return masking.overlay(self.original, image, self.soft_mask, self.box)


def prepare(request: GenerationRequest, max_pixels: int, warnings: list[str]) -> Prepared:
    """Open and size the init image (and mask) the way A1111's img2img / inpaint does."""
    w, h = request.width, request.height
    source = to_rgb(open_image(request.init_images[0], field="init_images", max_pixels=max_pixels))
    if len(request.init_images) > 1:
        warnings.append(f"{len(request.init_images)} init images were given; the first one is used for every "
                        "image of the job.")
    info: dict[str, Any] = {"Denoising strength": request.denoising_strength}
    if request.mode == "img2img":
        if request.resize_mode == 3:
            lw, lh = max(64, source.width // 8 * 8), max(64, source.height // 8 * 8)
            return Prepared(init=source.resize((w, h), Image.LANCZOS),
                            latent_source=source.resize((lw, lh), Image.LANCZOS), infotext=info)
        return Prepared(init=resize_image(source, w, h, request.resize_mode), infotext=info)

    # inpaint: the mask is prepared at the init image's own size, then cropped / resized with it
    raw_mask = open_image(request.mask, field="mask", max_pixels=max_pixels)
    mask = masking.prepare_mask(raw_mask, source.size, invert=bool(request.inpainting_mask_invert),
                                warnings=warnings)
    soft = masking.blur(mask, request.mask_blur)
    info.update({"Mask blur": request.mask_blur})
    if request.inpainting_mask_invert:
        info["Mask mode"] = "Inpaint not masked"
    info["Masked content"] = MASKED_CONTENT[request.inpainting_fill]
    if request.inpaint_full_res:
        box = masking.crop_region(soft, request.inpaint_full_res_padding)
        box = masking.expand_to_aspect(box, w, h, source.width, source.height)
        init = source.crop(box).resize((w, h), Image.LANCZOS)
        crop_mask = soft.crop(box).resize((w, h), Image.LANCZOS)
        info.update({"Inpaint area": "Only masked", "Masked area padding": request.inpaint_full_res_padding})
        prepared = Prepared(init=init, mask=crop_mask, original=source, soft_mask=soft, box=box, infotext=info)
    else:
        init = resize_image(source, w, h, request.resize_mode)
        pmask = resize_image(soft, w, h, request.resize_mode)
        original = source if source.size == (w, h) else init
        soft_full = soft if source.size == (w, h) else pmask
        prepared = Prepared(init=init, mask=pmask, original=original, soft_mask=soft_full, infotext=info)
    if MASKED_CONTENT[request.inpainting_fill] == "fill":
        prepared.init = masking.fill_masked(prepared.init, prepared.mask)
    return prepared


__all__ = ["Prepared", "prepare", "RESIZE_MODES"]
