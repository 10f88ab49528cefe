"""Tiny ControlNets for tests: built from the tiny UNet, written as a diffusers folder or an lllyasviel file."""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_controlnet(unet, seed: int = 0):
    """A ControlNet copied from ``unet`` with every weight perturbed (the zero convs too, so it acts)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))  # 8x down, like the VAE
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return cn.eval()


def write_diffusers(cn, path) -> str:
    cn.save_pretrained(os.fspath(path), safe_serialization=True)
    return os.fspath(path)


def write_ldm(cn, path, prefix: str = "control_model.") -> str:
    """lllyasviel layout (``control_model.input_blocks…``); .safetensors or a weights-only .pth by suffix."""
    from studio.controlnet.convert import controlnet_to_ldm

    sd = {k: v.detach().clone().contiguous() for k, v in controlnet_to_ldm(cn.state_dict(), cn.config, prefix).items()}
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    return path
