"""Stable Diffusion 1.x: CLIP ViT-L/14 text encoder, 8 attention heads at every level, 512 px."""
from __future__ import annotations

from .base import TextEncoder
from .unet_family import UNetFamily

SD_PIPELINES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                "inpaint": "StableDiffusionInpaintPipeline"}
SD_CONTROLNET_PIPELINES = {"txt2img": "StableDiffusionControlNetPipeline",
                           "img2img": "StableDiffusionControlNetImg2ImgPipeline",
                           "inpaint": "StableDiffusionControlNetInpaintPipeline"}
# least-squares fit of VAE decodes on the 4 latent channels (A1111's "Approx cheap", first published by Keturn)
SD_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)

FAMILY = UNetFamily(
    name="sd1", label="SD 1.x", short="SD1",
    text_encoders=(TextEncoder("text_encoder", "te1", "cond_stage_model.transformer.text_model.", "clip",
                               "<|endoftext|>", "lora_te_"),),
    vae_scale=0.18215, latent_rgb=SD_LATENT_RGB, kohya_version="sd_v1", modelspec_arch="stable-diffusion-v1",
    default_size=512, real_cross_width=768, real_text_widths=(768,), fixed_heads=8,
    pipelines=SD_PIPELINES, controlnet_pipelines=SD_CONTROLNET_PIPELINES, aliases=("sd1", "sd15", "sd_1"),
)
