"""Cheap live previews: latents -> RGB with one linear projection per family (no VAE decode).

The coefficients are the community's least-squares fits of VAE decodes against the 4 latent channels, as
used by A1111's "Approx cheap" preview (first published by Keturn for SD1). They are approximate: colours
and contrast are roughly right, detail is 8× coarser. They apply to the latents the UNet sees (already
multiplied by the VAE scaling factor), which is what a diffusers step callback hands out.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

# rows: latent channels 0..3, columns: R, G, B; output is roughly in [-1, 1]
SD_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
# SDXL (and its refiner) use a retrained VAE with a different latent space
SDXL_LATENT_RGB = (
    (0.3448, 0.4168, 0.4395),
    (-0.1953, -0.0290, 0.0250),
    (0.1074, 0.0886, -0.0163),
    (-0.3730, -0.2499, -0.2088),
)


def latent_rgb_coefficients(family: str | None) -> tuple[tuple[float, float, float], ...]:
    """The 4×3 projection for a family ("sd1", "sd2", "sdxl", "sdxl_refiner"; unknown -> SD1/SD2)."""
    return SDXL_LATENT_RGB if (family or "").lower().startswith("sdxl") else SD_LATENT_RGB


def latents_to_preview(latents: Any, family: str | None = None, *, scale: int = 8) -> Image.Image:
    """First image of ``latents`` ([B,C,h,w] or [C,h,w], tensor or array) as an RGB image ``scale``× larger.

    4 channels use the family's projection; other channel counts show their first three channels, each
    min-max normalised (a grey image for one channel).
    """
    import numpy as np
    import torch

    x = torch.as_tensor(latents).detach()
    if x.ndim == 4:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"Expected latents shaped [B,C,h,w] or [C,h,w], got {tuple(x.shape)}.")
    # One small image: numpy on the CPU from here. Torch's intra-op thread pool is slower than the work
    # itself at this size and stalls badly when the CPU is busy (e.g. the sampler running next to it).
    x = x.to("cpu", torch.float32).numpy()
    channels, h, w = x.shape
    if channels == 4:
        coefs = np.asarray(latent_rgb_coefficients(family), dtype=np.float32)
        rgb = np.tensordot(x, coefs, axes=(0, 0))          # h × w × 3, roughly in [-1, 1]
        rgb += 1.0
        rgb *= 127.5
    else:
        x = x[:3] if channels >= 3 else np.repeat(x[:1], 3, axis=0)
        lo = x.min(axis=(1, 2), keepdims=True)
        span = np.maximum(x.max(axis=(1, 2), keepdims=True) - lo, 1e-6)
        rgb = ((x - lo) / span * 255.0).transpose(1, 2, 0)
    pixels = np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    image = Image.fromarray(pixels)  # uint8 h×w×3 -> RGB
    return image.resize((w * scale, h * scale), Image.NEAREST) if scale != 1 else image
