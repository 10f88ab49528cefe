"""FLUX.1 LoRA training: kohya sd-scripts' ``flux_train_network`` layer set, the transformer's inputs for a
flow-matching training step, and kohya's output layout (BFL layer names, fused q / k / v rows).

The studio trains peft LoRAs on diffusers' modules, where BFL's fused ``img_attn.qkv`` / ``linear1`` are separate
q / k / v (/ MLP) Linears. A file layer of kohya's is one (down, up) pair over the fused rows; separate pairs
write exactly as one of rank n x r with the downs stacked and the ups block-diagonal (what sd-scripts itself
saves with ``split_qkv``).
"""
from __future__ import annotations

from typing import Any, Mapping

from . import flux_keys

BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def train_targets(denoiser) -> list[str]:
    """sd-scripts' lora_flux targets every Linear of the double- and single-stream blocks (attention, MLPs and
    the modulation layers); the embedders and the final layer are left alone."""
    import torch
    return [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(BLOCKS)]


def layout(denoiser) -> flux_keys.Layout:
    cfg = denoiser.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    single = denoiser.single_transformer_blocks
    return flux_keys.Layout(cfg.num_layers, cfg.num_single_layers, inner,
                            single[0].proj_mlp.out_features if len(single) else 4 * inner, cfg.guidance_embeds)


def kohya_layers(layers: Mapping[str, dict], denoiser) -> dict[str, dict]:
    """diffusers module -> {"lora_down.weight", "lora_up.weight", "alpha"}  =>  kohya's BFL layers.

    Scales are kept: a fused layer of n parts has rank n x r, so its alpha is n times the parts' (alpha / rank
    is what every loader multiplies by). sd-scripts' split_qkv save keeps the parts' alpha, which ComfyUI /
    diffusers then read at 1/n strength; the studio writes what it trained."""
    import torch
    out, used = {}, set()
    for bfl, rows in flux_keys.module_rows(layout(denoiser)).items():
        parts = [p for p, _, _ in rows]
        got = [layers.get(p) for p in parts]
        if not any(got):
            continue
        name = "lora_unet_" + bfl.replace(".", "_")
        if len(parts) == 1:
            out[name] = got[0]
            used.add(parts[0])
            continue
        if not all(got):
            missing = [p for p, g in zip(parts, got) if g is None]
            raise ValueError(f"{bfl} is one layer in kohya files; its parts {', '.join(missing)} were not trained")
        ranks = [g["lora_down.weight"].shape[0] for g in got]
        scales = {round(float(g["alpha"]) / r, 6) for g, r in zip(got, ranks)}
        if len(scales) != 1:
            raise ValueError(f"{bfl}: its parts were trained at different alpha / rank")
        out[name] = {"lora_down.weight": torch.cat([g["lora_down.weight"] for g in got], dim=0),
                     "lora_up.weight": torch.block_diag(*[g["lora_up.weight"] for g in got]),
                     "alpha": torch.tensor(scales.pop() * sum(ranks), dtype=torch.float32)}
        used.update(parts)
    left = set(layers) - used
    if left:
        raise ValueError(f"no kohya name for {', '.join(sorted(left)[:3])}")
    return out


def condition(family, components, captions: list[str], modules: Mapping[str, Any] | None = None) -> dict:
    """T5 sequence embeddings + CLIP pooled embedding of ``captions``, through FluxPipeline's own encode_prompt
    (the pipeline is a view over the same modules; ``modules`` are the training copies of the encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    c = components
    parts = {**c.text_modules(), **(modules or {}), "vae": c.vae, "unet": c.unet,
             "scheduler": FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config)}
    pipe = family.make_pipeline("txt2img", parts)
    device = next(parts["text_encoder_2"].parameters()).device
    hidden, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, device=device,
                                           max_sequence_length=family.max_sequence_length(c))
    return {"hidden": hidden, "pooled": pooled}


def prediction(family, denoiser, noisy, sigmas, cond: dict, guidance: float):
    """The transformer's velocity for latents ``noisy`` [B, C, h, w] at flow times ``sigmas`` [B] (0 clean,
    1 noise), back in [B, C, h, w]. dev takes ``guidance`` as an input (kohya trains dev at 1.0)."""
    import torch
    from diffusers import FluxPipeline
    b, _, h, w = noisy.shape
    dtype, device = noisy.dtype, noisy.device
    hidden = cond["hidden"].to(dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype)
    g = torch.full((b,), guidance, device=device, dtype=dtype) if denoiser.config.guidance_embeds else None
    out = denoiser(hidden_states=family.pack_latents(noisy), timestep=sigmas.to(dtype), guidance=g,
                   pooled_projections=cond["pooled"].to(dtype), encoder_hidden_states=hidden, txt_ids=txt_ids,
                   img_ids=img_ids, return_dict=False)[0]
    return family.unpack_latents(out, h * 8, w * 8)
