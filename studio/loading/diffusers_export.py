"""Components -> a diffusers pipeline or a diffusers folder on disk (the Merge tab's diffusers output)."""
from __future__ import annotations

import os

from .components import Components


def make_pipeline(c: Components, scheduler=None):
    """A diffusers txt2img pipeline over the components (no safety checker)."""
    from diffusers import (DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)
    sched = scheduler or DDIMScheduler.from_config(c.scheduler_config)
    if c.family in ("sd1", "sd2"):
        return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if c.family == "sdxl":
        return StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                         tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                         scheduler=sched)
    return StableDiffusionXLImg2ImgPipeline(vae=c.vae, text_encoder=None, text_encoder_2=c.text_encoder_2,
                                            tokenizer=None, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                            scheduler=sched, requires_aesthetics_score=True)


def write_diffusers_folder(components: Components, path) -> str:
    """Write as a diffusers folder (model_index.json + safetensors)."""
    make_pipeline(components).save_pretrained(os.fspath(path), safe_serialization=True)
    return os.fspath(path)
