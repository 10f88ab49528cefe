"""DeepCache (Ma, Fang and Wang, CVPR 2024): between two full UNet passes the deep features change little, so
after the first steps (where the layout forms) every ``interval``-th step runs the whole UNet and the steps
between run only its outer ring (``conv_in``, the first down block, the last up block and ``conv_out``), reusing
what the deeper blocks handed the last up block at the latest whole call. It changes pixels (the setting is off by default); ``tests/benchmarks/bench_speed.py``
measures its time and what the demo scorer says it costs.

Written here because neither diffusers 0.42 (its caches, ``apply_first_block_cache`` and the like, hook
transformer blocks) nor a kept package offers it for diffusers' ``UNet2DConditionModel``; the ring is built from
the model's own blocks and helpers (``get_time_embed``, ``get_aug_embed``, ...), as its ``forward`` does.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .lazy import torch


def supports(denoiser: Any) -> bool:
    """A UNet with down and up blocks (DiT transformers have no deep / shallow split of this kind)."""
    return all(hasattr(denoiser, a) for a in ("down_blocks", "up_blocks", "conv_in", "get_time_embed",
                                              "get_aug_embed", "process_encoder_hidden_states"))


class _Cache:
    """Per pass: the sampler's step (set by the pass after each one), the model calls so far, and the last up
    block's input at the latest whole call."""

    def __init__(self, interval: int, warmup: int = 0):
        self.interval = interval
        self.warmup = warmup
        self.step = 0
        self.calls = 0
        self.full = 0
        self.deep: Any = None

    def due(self) -> bool:
        """Whether this step runs the whole UNet: the first ``warmup`` steps (where the layout forms), then
        every ``interval``-th."""
        return self.step < self.warmup or (self.step - self.warmup) % self.interval == 0

    def capture(self, _module: Any, args: tuple, kwargs: dict) -> None:
        self.deep = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _embeddings(unet: Any, sample: Any, timestep: Any, encoder_hidden_states: Any, kw: dict) -> tuple[Any, Any]:
    """The time embedding and text states, as ``UNet2DConditionModel.forward`` computes them."""
    added = kw.get("added_cond_kwargs")
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), kw.get("timestep_cond"))
    class_emb = unet.get_class_embed(sample=sample, class_labels=kw.get("class_labels"))
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    return emb, states


def _ring(unet: Any, deep: Any, sample: Any, timestep: Any, encoder_hidden_states: Any, kw: dict) -> Any:
    """The outer ring of the UNet around the cached deep features."""
    emb, states = _embeddings(unet, sample, timestep, encoder_hidden_states, kw)
    attn = {"encoder_hidden_states": states, "attention_mask": kw.get("attention_mask"),
            "cross_attention_kwargs": kw.get("cross_attention_kwargs"),
            "encoder_attention_mask": kw.get("encoder_attention_mask")}
    h = unet.conv_in(sample)
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    if getattr(first, "has_cross_attention", False):
        _, res = first(hidden_states=h, temb=emb, **attn)
    else:
        _, res = first(hidden_states=h, temb=emb)
    # the last up block takes the first skip connections: conv_in's output and the first block's resnets
    skips = ((h,) + tuple(res))[:len(last.resnets)]
    if getattr(last, "has_cross_attention", False):
        out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, upsample_size=None,
                   encoder_hidden_states=states, cross_attention_kwargs=attn["cross_attention_kwargs"],
                   attention_mask=attn["attention_mask"], encoder_attention_mask=attn["encoder_attention_mask"])
    else:
        out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, upsample_size=None)
    if unet.conv_norm_out is not None:
        out = unet.conv_act(unet.conv_norm_out(out))
    return unet.conv_out(out)


@contextlib.contextmanager
def deep_cache(unet: Any, interval: int, warmup: int = 0) -> Iterator[_Cache | None]:
    """Within the block, ``unet`` runs whole on the first ``warmup`` steps, then on every ``interval``-th step,
    and only its outer ring in between (the caller sets ``cache.step`` as the sampler goes). Calls with
    ControlNet / adapter residuals always run whole (their residuals enter the deep blocks)."""
    if interval <= 1 or not supports(unet):
        yield None
        return
    cache = _Cache(interval, warmup)
    own = unet.__dict__.get("forward")          # an accelerate hook may have set one; it is put back
    whole = unet.forward
    hook = unet.up_blocks[-1].register_forward_pre_hook(cache.capture, with_kwargs=True)

    def forward(sample, timestep, encoder_hidden_states, *args, **kw):
        residuals = any(kw.get(k) is not None for k in ("down_block_additional_residuals",
                                                        "mid_block_additional_residual",
                                                        "down_intrablock_additional_residuals"))
        due = cache.due()
        cache.calls += 1
        deep = cache.deep
        if due or residuals or args or deep is None or deep.shape[0] != sample.shape[0]:
            cache.full += 1
            return whole(sample, timestep, encoder_hidden_states, *args, **kw)
        out = _ring(unet, deep, sample, timestep, encoder_hidden_states, kw)
        if kw.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
            return UNet2DConditionOutput(sample=out)
        return (out,)

    unet.forward = forward
    try:
        yield cache
    finally:
        hook.remove()
        if own is None:
            del unet.forward
        else:
            unet.forward = own
