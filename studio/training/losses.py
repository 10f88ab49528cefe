"""Text conditioning and the diffusion loss of one batch (epsilon or v target, min-SNR, noise offset, prior)."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


def step_generator(seed: int, index: int | str, salt: str = "noise") -> torch.Generator:
    """A CPU generator for micro-batch ``index``: noise and timesteps depend only on (seed, index), so a resumed
    run draws exactly what the uninterrupted run would have drawn."""
    digest = hashlib.sha256(f"{seed}:{index}:{salt}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def _hidden(te, ids: torch.Tensor, clip_skip: int, penultimate: bool = False):
    out = te(ids, output_hidden_states=clip_skip > 1 or penultimate)
    if penultimate:
        return out.hidden_states[-2], out
    if clip_skip > 1:
        # A1111 / kohya: take an earlier layer and apply the final layer norm to it
        norm = getattr(getattr(te, "text_model", te), "final_layer_norm")
        return norm(out.hidden_states[-clip_skip]), out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0], out


def _ids(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_text(components, captions: list[str], *, clip_skip: int = 1, text_encoder=None,
                text_encoder_2=None, sizes: list[tuple[int, int]] | None = None) -> dict:
    """UNet conditioning for ``captions``: ``{"hidden": ..., "added": {...} or None}``.

    Pooled families (SDXL): both encoders' penultimate layers concatenated, pooled output of the second and the
    size ids."""
    c = components
    if c.spec.prompt_style != "clip":        # flow families encode through their pipeline's own encoder
        trained = {k: v for k, v in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)) if v}
        return c.spec.training_condition(c, captions, trained)
    te = text_encoder or c.text_encoder
    device = next(te.parameters()).device
    if not c.spec.pooled:
        hidden, _ = _hidden(te, _ids(c.tokenizer, captions, device), clip_skip)
        return {"hidden": hidden, "added": None}
    te2 = text_encoder_2 or c.text_encoder_2
    h1, _ = _hidden(te, _ids(c.tokenizer, captions, device), clip_skip, penultimate=True)
    h2, out2 = _hidden(te2, _ids(c.tokenizer_2, captions, device), clip_skip, penultimate=True)
    pooled = out2.text_embeds
    sizes = sizes or [(1024, 1024)] * len(captions)
    # (original h, w, crop top, left, target h, w): buckets are resized + centre-cropped to their own size
    time_ids = torch.tensor([[h, w, 0, 0, h, w] for w, h in sizes], dtype=h1.dtype, device=device)
    return {"hidden": torch.cat([h1, h2], dim=-1), "added": {"text_embeds": pooled, "time_ids": time_ids}}


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas / (1 - alphas)


def diffusion_loss(unet, scheduler, latents: torch.Tensor, cond: dict, gen: torch.Generator, *,
                   noise_offset: float = 0.0, min_snr_gamma: float = 0.0, weight_dtype=None,
                   controlnet=None, control: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss [B] for ``latents`` (float32, on the UNet's device). With ``controlnet``, its residuals
    for the condition images ``control`` ([B, 3, H, W] in [0, 1]) are added to the UNet's (ControlNet training)."""
    b, ch = latents.shape[:2]
    device = latents.device
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, ch, 1, 1), generator=gen).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, t) if v_pred else noise
    dtype = weight_dtype or latents.dtype
    kw = {"added_cond_kwargs": cond["added"]} if cond.get("added") else {}
    if controlnet is not None:
        down, mid = controlnet(noisy.to(dtype), t, encoder_hidden_states=cond["hidden"].to(dtype),
                               controlnet_cond=control.to(device, dtype), return_dict=False, **kw)
        kw.update(down_block_additional_residuals=[d.to(dtype) for d in down],
                  mid_block_additional_residual=mid.to(dtype))
    pred = unet(noisy.to(dtype), t, cond["hidden"].to(dtype), **kw).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        s = snr(scheduler, t)
        w = torch.clamp(s, max=min_snr_gamma) / (s + 1 if v_pred else s)
        loss = loss * w
    return loss


def flow_sigmas(b: int, gen: torch.Generator, *, sampling: str = "shift", shift: float = 3.1582) -> torch.Tensor:
    """Flow times in (0, 1) for a batch, as kohya sd-scripts draws them (``--timestep_sampling``): "shift" the
    sigmoid of a normal draw pushed toward noise by ``shift`` (its FLUX recommendation), "sigmoid" unshifted,
    "uniform" uniform."""
    if sampling == "uniform":
        return torch.rand((b,), generator=gen)
    u = torch.sigmoid(torch.randn((b,), generator=gen))
    return u * shift / (1 + (shift - 1) * u) if sampling == "shift" else u


def flow_loss(spec, denoiser, latents: torch.Tensor, cond: dict, gen: torch.Generator, *, sampling: str = "shift",
              shift: float = 3.1582, guidance: float = 1.0, noise_offset: float = 0.0,
              weight_dtype=None) -> torch.Tensor:
    """Per-sample rectified-flow loss [B]: the latents moved toward noise along a straight line,
    x_s = (1 - s) x0 + s n, and the velocity n - x0 as the target (kohya's ``model_prediction_type raw``)."""
    b, ch = latents.shape[:2]
    device = latents.device
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, ch, 1, 1), generator=gen).to(device)
    sigmas = flow_sigmas(b, gen, sampling=sampling, shift=shift).to(device)
    s = sigmas.view(b, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    pred = spec.flow_prediction(denoiser, noisy.to(weight_dtype or latents.dtype), sigmas, cond, guidance)
    return F.mse_loss(pred.float(), (noise - latents).float(), reduction="none").mean(dim=(1, 2, 3))
