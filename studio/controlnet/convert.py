"""ControlNet tensors: diffusers config from shapes, and the LDM (lllyasviel) <-> diffusers key mapping.

An lllyasviel ControlNet is a copy of the UNet encoder plus ``zero_convs`` (one 1x1 conv per encoder output),
``middle_block_out`` and ``input_hint_block`` (the conditioning-image encoder: convs at even indices, SiLUs
between). One prefix map, built from the config, serves both directions so save and load cannot drift apart.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

from ..errors import ModelLoadError
from .. import families
from ..loading.ldm_config import encoder_levels
from ..loading.ldm_export import UNET_RESNET, UNET_TOP, _map_key, _unet_prefix_map

LDM_PREFIX = "control_model."
SDXL_TIME_EMBED_DIM = 256          # SDXL's addition_time_embed_dim (not readable from the ControlNet alone)

Shapes = Mapping[str, Sequence[int]]


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def _has(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def strip_prefix(sd: dict) -> dict:
    """Drop ``control_model.`` (full lllyasviel files) so both LDM spellings look alike."""
    if any(k.startswith(LDM_PREFIX) for k in sd):
        return {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
    return sd


def file_kind(keys: Sequence[str]) -> str:
    """"ldm", "diffusers", or what unsupported thing the file is ("controlnet-lora", "t2i-adapter", ...)."""
    joined = " ".join(list(keys)[:5000])
    if "lora_controlnet" in keys or any(k.endswith((".up", ".down")) for k in keys):
        return "controlnet-lora"
    if "lllite" in joined:
        return "controlnet-lllite"
    if any(k.startswith(("adapter.", "body.")) for k in keys) or "adapter.body." in joined:
        return "t2i-adapter"
    if any(k.startswith(("input_hint_block.", LDM_PREFIX + "input_hint_block.")) for k in keys):
        return "ldm"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return "diffusers"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "checkpoint"
    return "unknown"


UNSUPPORTED = {
    "controlnet-lora": ("a ControlNet-LoRA (Stability control-LoRA)", "ControlNet-LoRA files are not supported yet; "
                        "use a full ControlNet model for now"),
    "controlnet-lllite": ("a ControlNet-LLLite (kohya)", "ControlNet-LLLite files are not supported yet"),
    "t2i-adapter": ("a T2I-Adapter", "T2I-Adapters are not supported yet; use a ControlNet model for now"),
    "checkpoint": ("a Stable Diffusion checkpoint", "put it in models/Stable-diffusion"),
    "unknown": ("not a ControlNet (no input_hint_block / controlnet_cond_embedding tensors)",
                "use a ControlNet .safetensors/.pth from lllyasviel or a diffusers ControlNet folder"),
}


def raise_unsupported(kind: str, path: str) -> None:
    what, fix = UNSUPPORTED[kind]
    raise ModelLoadError(f"{os.path.basename(path)} is {what}.", path=path, fix=fix + ".")


# ---- key mapping -----------------------------------------------------------------------------------

def prefix_map(layers_per_block: int, n_levels: int, n_hint_blocks: int) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for every ControlNet module."""
    m = dict(UNET_TOP)
    m.update(_unet_prefix_map({"layers_per_block": layers_per_block, "block_out_channels": [0] * n_levels,
                               "up_block_types": []}))
    n_out = 1 + n_levels * layers_per_block + (n_levels - 1)   # conv_in, resnets, downsamplers
    m.update({f"controlnet_down_blocks.{i}.": f"zero_convs.{i}.0." for i in range(n_out)})
    m["controlnet_mid_block."] = "middle_block_out.0."
    m["controlnet_cond_embedding.conv_in."] = "input_hint_block.0."
    m.update({f"controlnet_cond_embedding.blocks.{j}.": f"input_hint_block.{2 * (j + 1)}."
              for j in range(n_hint_blocks)})
    m["controlnet_cond_embedding.conv_out."] = f"input_hint_block.{2 * (n_hint_blocks + 1)}."
    return m


def _map_for_config(config: Mapping) -> dict[str, str]:
    n_hint = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    return prefix_map(config["layers_per_block"], len(config["block_out_channels"]), n_hint)


def to_ldm_key(key: str, prefixes: Mapping[str, str]) -> str:
    return _map_key(key, dict(prefixes), UNET_RESNET)


def controlnet_to_ldm(state: Mapping, config: Mapping, prefix: str = LDM_PREFIX) -> dict:
    """diffusers ControlNetModel state dict -> lllyasviel keys (``control_model.`` + LDM names)."""
    m = _map_for_config(config)
    return {prefix + to_ldm_key(k, m): v for k, v in state.items()}


def ldm_to_diffusers_state(sd: Mapping, expected_keys: Sequence[str], config: Mapping, path: str) -> dict:
    """Pick the file's LDM tensors for each diffusers key; strict: names the missing and unused tensors."""
    m = _map_for_config(config)
    out, used, missing = {}, set(), []
    for key in expected_keys:
        ldm = to_ldm_key(key, m)
        if ldm in sd:
            out[key] = sd[ldm]
            used.add(ldm)
        else:
            missing.append(ldm)
    unused = sorted(set(sd) - used)
    if missing or unused:
        raise ModelLoadError(
            f"{os.path.basename(path)}: the ControlNet tensors do not fit the architecture read from the file "
            f"(missing {missing[:4]}{'…' if len(missing) > 4 else ''}, unexpected {unused[:4]}"
            f"{'…' if len(unused) > 4 else ''}).", path=path,
            fix="the file is damaged or an unsupported ControlNet variant; re-download it or use a diffusers folder.")
    return out


def diffusers_shapes_to_ldm(shapes: Shapes) -> dict[str, tuple]:
    """Rename a diffusers-keyed ControlNet's shapes to LDM names, so one config reader serves both."""
    levels = _indices(shapes, "down_blocks.")
    lpb = len(_indices(shapes, "down_blocks.0.resnets."))
    n_hint = len(_indices(shapes, "controlnet_cond_embedding.blocks."))
    m = prefix_map(lpb, len(levels), n_hint)
    out = {}
    for k, s in shapes.items():
        try:
            out[to_ldm_key(k, m)] = tuple(s)
        except KeyError:
            continue  # e.g. buffers diffusers stores that LDM does not have
    return out


# ---- config from shapes ------------------------------------------------------------------------------

def controlnet_config(shapes: Shapes, path: str = "", *, global_pool: bool = False,
                      addition_time_embed_dim: int | None = None) -> tuple[dict, str]:
    """(ControlNetModel config, family) from LDM-named ControlNet shapes (``control_model.`` stripped)."""
    if "input_blocks.0.0.weight" not in shapes or "input_hint_block.0.weight" not in shapes:
        raise_unsupported(file_kind(list(shapes)), path)
    mc, in_ch = shapes["input_blocks.0.0.weight"][:2]
    levels = encoder_levels(shapes, "")
    lpb = {lv["res"] for lv in levels}
    if len(lpb) != 1 or None in [lv["ch"] for lv in levels]:
        raise ModelLoadError(f"{os.path.basename(path)}: unusual ControlNet layout (levels with different numbers "
                             "of res blocks).", path=path, fix="use a standard SD 1/2/XL ControlNet.")
    channels = [int(lv["ch"]) for lv in levels]
    cross = next((int(s[1]) for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if cross is None:
        raise ModelLoadError(f"{os.path.basename(path)}: the ControlNet has no cross-attention layers.", path=path,
                             fix="use a ControlNet for SD 1.x / 2.x / SDXL.")
    linear = any(lv.get("linear") for lv in levels) or ("middle_block.1.proj_in.weight" in shapes and
                                                        len(shapes["middle_block.1.proj_in.weight"]) == 2)
    family = families.detect_controlnet({"cross_attention_dim": cross, "use_linear_projection": linear,
                                         "addition_embed_type": "text_time" if "label_emb.0.0.weight" in shapes
                                         else None}, path)
    mid_depth = len(_indices(shapes, "middle_block.1.transformer_blocks."))
    # hint encoder: convs at even indices; conv_in, then (same, stride-2 up) pairs, then conv_out
    convs = [i for i in _indices(shapes, "input_hint_block.") if f"input_hint_block.{i}.weight" in shapes]
    outs = [int(shapes[f"input_hint_block.{i}.weight"][0]) for i in convs[:-1]]
    heads = family.attention_heads(channels)  # cannot be read off the weights: the family's rule
    depths = [max(1, lv["depth"]) for lv in levels]
    if levels[-1]["depth"] == 0 and mid_depth:
        depths[-1] = mid_depth  # the mid block reads the last entry
    cfg = {
        "in_channels": int(in_ch), "conditioning_channels": int(shapes["input_hint_block.0.weight"][1]),
        "down_block_types": ["CrossAttnDownBlock2D" if lv["depth"] else "DownBlock2D" for lv in levels],
        "block_out_channels": channels, "layers_per_block": lpb.pop(), "cross_attention_dim": cross,
        "attention_head_dim": heads, "use_linear_projection": linear,
        "transformer_layers_per_block": depths, "norm_num_groups": 32,
        "conditioning_embedding_out_channels": [outs[0]] + outs[2::2],
        "global_pool_conditions": bool(global_pool),
    }
    if int(mc) != channels[0]:
        raise ModelLoadError(f"{os.path.basename(path)}: conv_in width differs from the first level.", path=path,
                             fix="use a standard SD 1/2/XL ControlNet.")
    if "label_emb.0.0.weight" in shapes:
        adm_in = int(shapes["label_emb.0.0.weight"][1])
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm_in,
                   addition_time_embed_dim=int(addition_time_embed_dim or SDXL_TIME_EMBED_DIM))
    return cfg, family.name
