"""Flux.1 transformer tensors: the BFL layout (``double_blocks.N.img_attn.qkv``...) <-> diffusers'.

diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes the released width (inner dim
3072) to split the single blocks' fused ``linear1``, so it cannot read a model of any other width, and it has no
inverse. One rule table, built from the sizes read off the tensors, serves both directions here (and the LoRA
key mapping: a LoRA on a fused BFL layer patches row ranges of diffusers' separate q / k / v modules).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Rule:
    bfl: str                          # BFL module name (no .weight / .bias)
    parts: tuple[str, ...]            # diffusers module names, in row order
    sizes: tuple[int, ...] | None     # row count of each part (None: a plain rename)
    swap: bool = False                # halves swapped (BFL shift, scale -> diffusers scale, shift)


@dataclass(frozen=True)
class Layout:
    double: int                       # double-stream blocks
    single: int                       # single-stream blocks
    inner: int                        # hidden width (heads x head width)
    mlp: int                          # single blocks' MLP width
    guidance: bool                    # a guidance embedder (dev), none in schnell


def strip(sd: Mapping) -> dict:
    """BFL keys without ComfyUI's ``model.diffusion_model.`` prefix (tensors or shapes pass through)."""
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}


def _count(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def layout_of(shapes: Mapping[str, Sequence[int]]) -> Layout:
    """The sizes of a BFL-keyed transformer (prefix stripped) from its tensor shapes."""
    inner = int(shapes["img_in.weight"][0])
    single = _count(shapes, "single_blocks.")
    mlp = int(shapes["single_blocks.0.linear1.weight"][0]) - 3 * inner if single else 4 * inner
    return Layout(_count(shapes, "double_blocks."), single, inner, mlp, "guidance_in.in_layer.weight" in shapes)


def rules(layout: Layout) -> list[Rule]:
    d = layout.inner
    out = [Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), None),
           Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), None),
           Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), None),
           Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), None),
           Rule("txt_in", ("context_embedder",), None), Rule("img_in", ("x_embedder",), None),
           Rule("final_layer.linear", ("proj_out",), None),
           Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), None, swap=True)]
    if layout.guidance:
        out += [Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), None),
                Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), None)]
    for i in range(layout.double):
        b, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        out += [Rule(b + "img_mod.lin", (t + "norm1.linear",), None),
                Rule(b + "txt_mod.lin", (t + "norm1_context.linear",), None),
                Rule(b + "img_attn.qkv", (t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"), (d, d, d)),
                Rule(b + "txt_attn.qkv", (t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"),
                     (d, d, d)),
                Rule(b + "img_attn.norm.query_norm", (t + "attn.norm_q",), None),
                Rule(b + "img_attn.norm.key_norm", (t + "attn.norm_k",), None),
                Rule(b + "txt_attn.norm.query_norm", (t + "attn.norm_added_q",), None),
                Rule(b + "txt_attn.norm.key_norm", (t + "attn.norm_added_k",), None),
                Rule(b + "img_mlp.0", (t + "ff.net.0.proj",), None), Rule(b + "img_mlp.2", (t + "ff.net.2",), None),
                Rule(b + "txt_mlp.0", (t + "ff_context.net.0.proj",), None),
                Rule(b + "txt_mlp.2", (t + "ff_context.net.2",), None),
                Rule(b + "img_attn.proj", (t + "attn.to_out.0",), None),
                Rule(b + "txt_attn.proj", (t + "attn.to_add_out",), None)]
    for i in range(layout.single):
        b, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        out += [Rule(b + "modulation.lin", (t + "norm.linear",), None),
                Rule(b + "linear1", (t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp"),
                     (d, d, d, layout.mlp)),
                Rule(b + "norm.query_norm", (t + "attn.norm_q",), None),
                Rule(b + "norm.key_norm", (t + "attn.norm_k",), None),
                Rule(b + "linear2", (t + "proj_out",), None)]
    return out


def _suffixes(rule: Rule) -> tuple[tuple[str, str], ...]:
    """(BFL tensor suffix, diffusers tensor suffix): RMS norms keep a ``scale``, diffusers calls it weight."""
    if rule.bfl.endswith(("query_norm", "key_norm")):
        return (("scale", "weight"),)
    return (("weight", "weight"), ("bias", "bias"))


def _swap(t):
    import torch
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_diffusers(sd: Mapping) -> dict:
    """BFL tensors (with or without the ComfyUI prefix) -> FluxTransformer2DModel's state dict."""
    import torch
    sd = strip(sd)
    out = {}
    for rule in rules(layout_of({k: tuple(getattr(v, "quant_shape", None) or v.shape) for k, v in sd.items()})):
        for src, dst in _suffixes(rule):
            key = f"{rule.bfl}.{src}"
            if key not in sd:
                continue
            t = _swap(sd[key]) if rule.swap else sd[key]
            # row views of the fused tensor: together they are all of it, so nothing is held twice or copied
            pieces = torch.split(t, list(rule.sizes), dim=0) if rule.sizes else (t,)
            for part, piece in zip(rule.parts, pieces):
                out[f"{part}.{dst}"] = piece
    return out


def to_bfl(sd: Mapping, *, prefix: str = "") -> dict:
    """FluxTransformer2DModel's state dict -> BFL tensors (``prefix`` e.g. ``model.diffusion_model.``)."""
    import torch
    inner = int(sd["x_embedder.weight"].shape[0])
    single = _count(sd, "single_transformer_blocks.")
    layout = Layout(_count(sd, "transformer_blocks."), single, inner,
                    int(sd["single_transformer_blocks.0.proj_mlp.weight"].shape[0]) if single else 4 * inner,
                    "time_text_embed.guidance_embedder.linear_1.weight" in sd)
    out = {}
    for rule in rules(layout):
        for src, dst in _suffixes(rule):
            keys = [f"{part}.{dst}" for part in rule.parts]
            if not all(k in sd for k in keys):
                continue
            t = torch.cat([sd[k] for k in keys], dim=0) if len(keys) > 1 else sd[keys[0]]
            out[f"{prefix}{rule.bfl}.{src}"] = _swap(t) if rule.swap else t
    return out


def module_rows(layout: Layout) -> dict[str, list[tuple[str, int, int]]]:
    """BFL module -> [(diffusers module, first row, end row)] (a LoRA on a fused layer splits by rows)."""
    out = {}
    for rule in rules(layout):
        sizes = rule.sizes or (None,)
        start, parts = 0, []
        for part, n in zip(rule.parts, sizes):
            parts.append((part, start, start + n if n else -1))
            start += n or 0
        out[rule.bfl] = parts
    return out


# XLabs-AI's LoRA processors (x-flux, XLabs-AI/flux-lora-collection): lora1 is the image stream, lora2 the text
# stream. A processor's fused q / k / v LoRA is split by rows with the down matrix shared, as diffusers'
# ``_convert_xlabs_flux_lora_to_diffusers`` reads it; in a single block it covers linear1's q / k / v rows only
# (not its MLP rows). The files store no alpha: scale 1.
XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
                "proj_lora2": "txt_attn.proj"}


def xlabs_rows(layout: Layout) -> dict[str, list[tuple[str, int, int]]]:
    """XLabs processor LoRA (``double_blocks.0.processor.qkv_lora1``) -> rows, as ``module_rows`` gives them."""
    rows = module_rows(layout)
    out = {}
    for i in range(layout.double):
        for name, bfl in XLABS_DOUBLE.items():
            out[f"double_blocks.{i}.processor.{name}"] = rows[f"double_blocks.{i}.{bfl}"]
    for i in range(layout.single):
        out[f"single_blocks.{i}.processor.qkv_lora"] = rows[f"single_blocks.{i}.linear1"][:3]
        out[f"single_blocks.{i}.processor.proj_lora"] = rows[f"single_blocks.{i}.linear2"]
    return out
