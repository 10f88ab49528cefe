"""Stable Diffusion 2.x: OpenCLIP ViT-H/14 read at its penultimate block, 64-wide heads; 768-v releases."""
from __future__ import annotations

from .base import TextEncoder
from .sd1 import SD_CONTROLNET_PIPELINES, SD_LATENT_RGB, SD_PIPELINES
from .unet_family import UNetFamily

FAMILY = UNetFamily(
    name="sd2", label="SD 2.x", short="SD2",
    text_encoders=(TextEncoder("text_encoder", "te1", "cond_stage_model.model.", "open_clip", "!", "lora_te_",
                               drop_last=True),),
    vae_scale=0.18215, latent_rgb=SD_LATENT_RGB, kohya_version="sd_v2", kohya_v2=True, modelspec_arch="stable-diffusion-v2-512",
    default_size=512, real_cross_width=1024, real_text_widths=(1024,), v_prediction_variant=True, v_sample_size=96, linear_projection=True,
    pipelines=SD_PIPELINES, controlnet_pipelines=SD_CONTROLNET_PIPELINES, aliases=("sd2", "sd_2", "stable-diffusion-v2"),
)
