"""Helpers for training tests: a fixed-noise evaluation loss and base-model loading."""
from __future__ import annotations

import torch


def fresh_base(cfg):
    from studio.training.trainer import load_base
    return load_base(cfg.resolved())


@torch.no_grad()
def eval_loss(components, cfg, n_t: int = 6) -> float:
    """Mean denoising loss over the dataset at fixed timesteps and noise (same draws for every model)."""
    from diffusers import DDPMScheduler
    from studio.training.buckets import LatentCache
    from studio.training.dataset import scan_dataset
    from studio.training.losses import encode_text
    items = scan_dataset(cfg.dataset_dir, min_side=32).items
    cache = LatentCache(components.vae)
    lat = torch.stack([cache.get(i.path, (cfg.resolution, cfg.resolution), False) for i in items])
    cond = encode_text(components, [i.caption for i in items])
    sched = DDPMScheduler.from_config(components.scheduler_config)
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    for t in torch.linspace(50, 950, n_t).long():
        noise = torch.randn(lat.shape, generator=gen)
        tt = t.repeat(len(items))
        pred = components.unet(sched.add_noise(lat, noise, tt), tt, cond["hidden"]).sample
        total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / n_t
