"""SDXL base (CLIP-L + OpenCLIP bigG, pooled text and size ids) and the SDXL refiner (bigG only, aesthetic score)."""
from __future__ import annotations

from .base import TextEncoder
from .unet_family import UNetFamily

XL_PIPELINES = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                "inpaint": "StableDiffusionXLInpaintPipeline"}
XL_CONTROLNET_PIPELINES = {"txt2img": "StableDiffusionXLControlNetPipeline",
                           "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
                           "inpaint": "StableDiffusionXLControlNetInpaintPipeline"}
# SDXL's retrained VAE has its own latent space (same least-squares fit as SD_LATENT_RGB)
XL_LATENT_RGB = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)

FAMILY = UNetFamily(
    name="sdxl", label="SDXL", short="SDXL",
    text_encoders=(
        TextEncoder("text_encoder", "te1", "conditioner.embedders.0.transformer.text_model.", "clip",
                    "<|endoftext|>", "lora_te1_", embedding_part="clip_l"),
        TextEncoder("text_encoder_2", "te2", "conditioner.embedders.1.model.", "open_clip", "!", "lora_te2_",
                    embedding_part="clip_g", with_projection=True, tokenizer_folder="tokenizer_2")),
    vae_scale=0.13025, latent_rgb=XL_LATENT_RGB, kohya_version="sdxl_base_v1-0",
    modelspec_arch="stable-diffusion-xl-v1-base", default_size=1024, real_cross_width=2048, real_text_widths=(768, 1280), pooled=True, trains_embeddings=False,
    kohya_unet_ldm_names=True, linear_projection=True, pipelines=XL_PIPELINES,
    controlnet_pipelines=XL_CONTROLNET_PIPELINES,
    aliases=("sdxl", "sd_xl", "stable-diffusion-xl"),
    defaults={"cfg_scale": 5.0},     # Forge's "xl" preset
)

REFINER = UNetFamily(
    name="sdxl_refiner", label="SDXL refiner", short="SDXL refiner",
    text_encoders=(
        TextEncoder("text_encoder_2", "te2", "conditioner.embedders.0.model.", "open_clip", "!", "lora_te2_",
                    embedding_part="clip_g", with_projection=True, tokenizer_folder="tokenizer_2"),),
    vae_scale=0.13025, latent_rgb=XL_LATENT_RGB, kohya_version="sdxl_refiner_v1-0",
    modelspec_arch="stable-diffusion-xl-v1-refiner", default_size=1024, real_cross_width=1280, real_text_widths=(1280,), pooled=True,
    size_ids=5, aesthetic_score=True, txt2img=False, controlnet=False, trains_embeddings=False,
    kohya_unet_ldm_names=True, linear_projection=True, pipelines=XL_PIPELINES, controlnet_pipelines={},
    aliases=("sdxl_refiner", "stable-diffusion-xl-v1-refiner"),
)
