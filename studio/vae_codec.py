"""VAE encode / decode at the VAE's own dtype on the pipeline's execution device.

Every mode encodes images here and hands the pipeline latents (in the UNet's dtype), and every pipeline returns
latents that are decoded here. diffusers would otherwise run the VAE itself with the image cast to the prompt's
dtype (an fp32 VAE beside an fp16 UNet fails: "Input type (c10::Half) and bias type (float)") and, on SDXL, its
``force_upcast`` casts the shared VAE to fp32 and back to fp16 (undoing --no-half-vae and the NaN retry).

The execution device is the pipeline's, not the VAE's: under --medvram the VAE rests on the CPU and under
--lowvram its parameters are ``meta`` until a forward runs.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from . import devices
from .errors import StudioError
from .lazy import torch


def _device(pipe: Any) -> Any:
    return pipe._execution_device


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def scale(vae: Any, z: torch.Tensor, decode: bool) -> torch.Tensor:
    """Latents to the UNet's scale (encode) or back (decode), with SDXL-style mean/std where the VAE has them
    and FLUX's shift."""
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None)
    if shift is not None:
        return z / cfg.scaling_factor + shift if decode else (z - shift) * cfg.scaling_factor
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(z)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(z)
        return z * std_t / cfg.scaling_factor + mean_t if decode else (z - mean_t) * cfg.scaling_factor / std_t
    return z / cfg.scaling_factor if decode else z * cfg.scaling_factor


def _to_fp32(vae: Any, warnings: list[str] | None) -> None:
    if warnings is not None:
        warnings.append(f"The VAE produced NaNs (a black image) in {_dtype_name(vae.dtype)}; the images were "
                        "decoded again in fp32 and this VAE stays in fp32. Start with --no-half-vae to skip the "
                        "retry.")
    vae.to(torch.float32)


def _check_latents(latents: torch.Tensor, unet_dtype: Any) -> None:
    """NaNs before the VAE came from the UNet: an fp32 VAE cannot help, a higher model precision can."""
    if bool(torch.isfinite(latents).all()):
        return
    name = _dtype_name(unet_dtype)
    raise StudioError(f"The model produced NaNs (a black image) while sampling in {name}, before the VAE.",
                      fix="start with --precision fp32 or --precision bf16 (or --no-half, as in A1111); some "
                          "cards and some checkpoints overflow in fp16" if name == "float16" else
                          "start with --precision fp32 (--no-half); check the checkpoint, the LoRAs and the CFG "
                          "scale")


def _decode_once(vae: Any, z: torch.Tensor, device: Any) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(scale(vae, z.to(device, vae.dtype), True), return_dict=False)[0]


def _decode_fitting(vae: Any, z: torch.Tensor, device: Any, warnings: list[str]) -> torch.Tensor:
    """Decode; out of device memory (SDXL at hires sizes), free the cache and decode again in tiles."""
    try:
        return _decode_once(vae, z, device)
    except torch.cuda.OutOfMemoryError:
        pass   # retried outside the handler, so the failed attempt's frames and activations are freed first
    devices.release_memory(device)
    warnings.append("Out of device memory while decoding the image: it was decoded again in tiles (VAE tiling).")
    tiling = getattr(vae, "use_tiling", False)
    vae.enable_tiling()
    try:
        return _decode_once(vae, z, device)
    except torch.cuda.OutOfMemoryError:
        pass
    finally:
        if not tiling:
            vae.disable_tiling()
    devices.release_memory(device)
    raise StudioError("Out of device memory while decoding the image, even in tiles.",
                      fix="lower the size or the batch size, or start with --medvram or --lowvram")


def decode(pipe: Any, latents: torch.Tensor, warnings: list[str]) -> list[Image.Image]:
    """Latents -> PIL images the way the diffusers pipeline does it, retrying in fp32 on NaNs."""
    vae, device = pipe.vae, _device(pipe)
    _check_latents(latents, (getattr(pipe, "unet", None) or pipe.transformer).dtype)
    image = _decode_fitting(vae, latents, device, warnings)
    if torch.isnan(image).any() and vae.dtype != torch.float32:
        _to_fp32(vae, warnings)
        image = _decode_fitting(vae, latents, device, warnings)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


def encode_pixels(pipe: Any, pixels: torch.Tensor, warnings: list[str] | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] (N, 3, H, W) -> scaled latents in the VAE's dtype (the distribution's mode:
    deterministic); give them to a pipeline's ``image=`` / ``masked_image_latents=`` in the UNet's dtype."""
    vae, device = pipe.vae, _device(pipe)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()

    z = run()
    if torch.isnan(z).any() and vae.dtype != torch.float32:
        _to_fp32(vae, warnings)
        z = run()
    return scale(vae, z, False)


def encode(pipe: Any, image: Any, warnings: list[str] | None = None, *, height: int | None = None,
           width: int | None = None) -> torch.Tensor:
    """PIL image(s) -> scaled latents (see ``encode_pixels``); ``height`` / ``width`` resize as the pipeline's
    own preprocessing would."""
    return encode_pixels(pipe, pipe.image_processor.preprocess(image, height=height, width=width), warnings)
