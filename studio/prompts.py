"""Prompt encoding into the embeddings the diffusers pipelines take.

We encode ourselves rather than letting the pipeline do it: diffusers 0.42's clip-skip path reaches for
``text_encoder.text_model``, which transformers 5 removed from CLIPTextModel, and the A1111 prompt language
(weights, chunks, BREAK) needs its own encoder anyway. Plain prompts give bit-identical embeddings to diffusers'.
"""
from __future__ import annotations

from typing import Any

import torch


def _final_norm(text_encoder: Any) -> Any:
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def _tokens(tokenizer: Any, text: str, device: torch.device) -> torch.Tensor:
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def _encode_sd(text_encoder: Any, tokenizer: Any, text: str, clip_skip: int) -> torch.Tensor:
    """SD1/SD2: last hidden state, or the one ``clip_skip - 1`` layers earlier with the final layer norm."""
    ids = _tokens(tokenizer, text, text_encoder.device)
    if clip_skip <= 1:
        out = text_encoder(ids)[0]
    else:
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states
        out = _final_norm(text_encoder)(hidden[-clip_skip])
    return out.to(text_encoder.dtype)


def _encode_sdxl(components: Any, text: str, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: penultimate layers of both encoders concatenated, pooled output of the second."""
    parts, pooled = [], None
    for tok, enc in ((components.tokenizer, components.text_encoder),
                     (components.tokenizer_2, components.text_encoder_2)):
        if enc is None:
            continue
        out = enc(_tokens(tok, text, enc.device), output_hidden_states=True)
        pooled = out[0]
        parts.append(out.hidden_states[-(clip_skip + 1)])
    return torch.cat(parts, dim=-1), pooled


@torch.no_grad()
def encode_for_pipeline(components: Any, prompt: str, negative_prompt: str, clip_skip: int = 1) -> dict:
    """Keyword arguments (``prompt_embeds`` ...) for a txt2img pipeline call, batch of one."""
    if components.family in ("sdxl", "sdxl_refiner"):
        cond, pooled = _encode_sdxl(components, prompt, clip_skip)
        uncond, neg_pooled = _encode_sdxl(components, negative_prompt, clip_skip)
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": neg_pooled}
    cond = _encode_sd(components.text_encoder, components.tokenizer, prompt, clip_skip)
    uncond = _encode_sd(components.text_encoder, components.tokenizer, negative_prompt, clip_skip)
    return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
