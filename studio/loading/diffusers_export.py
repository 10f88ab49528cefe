"""Components -> a diffusers pipeline or a diffusers folder on disk (the Merge tab's diffusers output)."""
from __future__ import annotations

import os

from .components import Components


def make_pipeline(c: Components, scheduler=None):
    """A diffusers pipeline over the components (no safety checker): txt2img, or img2img for a family that
    cannot start from text (the SDXL refiner's folder layout)."""
    from diffusers import DDIMScheduler
    spec = c.spec
    modules = {**c.text_modules(), "vae": c.vae, "unet": c.unet,
               "scheduler": scheduler or DDIMScheduler.from_config(c.scheduler_config)}
    return spec.make_pipeline("txt2img" if spec.txt2img else "img2img", modules)


def write_diffusers_folder(components: Components, path) -> str:
    """Write as a diffusers folder (model_index.json + safetensors)."""
    make_pipeline(components).save_pretrained(os.fspath(path), safe_serialization=True)
    return os.fspath(path)
