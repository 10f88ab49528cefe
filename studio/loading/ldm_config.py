"""Read diffusers configs off an LDM-layout checkpoint's tensor names and shapes (no network).

Which family a file is, and where its text encoders sit, is the families' knowledge (``studio.families``);
the functions here read the layout of the parts the SD UNet families share.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence
from typing import TYPE_CHECKING, Iterable

from ..errors import ModelLoadError

if TYPE_CHECKING:   # the families ask this module, never the other way round
    from ..families.base import Family

UNET = "model.diffusion_model."

VAE_PREFIXES = ("first_stage_model.", "vae.")
DEFAULT_VAE_SCALE = 0.18215   # SD 1/2's, for a VAE whose family nothing tells

Shapes = Mapping[str, Sequence[int]]


def shapes_of(sd: Mapping) -> dict[str, tuple[int, ...]]:
    """Name -> shape for a state dict (tensors) or pass shapes through."""
    # a quantised GGUF tensor's shape is its bytes': quant_shape is the logical one
    return {k: tuple(getattr(v, "quant_shape", None) or v.shape) if hasattr(v, "shape") else tuple(v)
            for k, v in sd.items()}


def normalize_keys(sd: dict) -> dict:
    """Old SD1 files name CLIP ``cond_stage_model.transformer.embeddings…`` (pre-``text_model`` transformers)."""
    old = "cond_stage_model.transformer."
    if any(k.startswith(old) and not k.startswith(old + "text_model.") for k in sd):
        return {(old + "text_model." + k[len(old):] if k.startswith(old) and
                 not k.startswith(old + "text_model.") else k): v for k, v in sd.items()}
    return sd


def cross_width(shapes: Mapping) -> int | None:
    """The UNet's cross-attention input width (the text features it reads), or None without cross-attention."""
    for k, s in shapes.items():
        if k.startswith(UNET) and k.endswith("attn2.to_k.weight"):
            return int(s[1])
    return None


def linear_text_projection(sd: dict, prefixes: Iterable[str]) -> dict:
    """diffusers' ``convert_diffusers_to_original_sdxl.py`` writes the OpenCLIP projection as
    ``…model.text_projection.weight`` (nn.Linear layout, [proj, width]); Stability's files (and the loader) use
    ``…model.text_projection`` ([width, proj], used as ``x @ P``). Rename and transpose; works on tensors and on
    header shapes alike. ``prefixes``: where OpenCLIP encoders sit (``families.open_clip_prefixes()``)."""
    out = sd
    for prefix in sorted(prefixes):
        linear, ldm = prefix + "text_projection.weight", prefix + "text_projection"
        if linear in sd and ldm not in sd:
            if out is sd:
                out = dict(sd)
            value = out.pop(linear)
            out[ldm] = value.T.contiguous() if hasattr(value, "contiguous") else tuple(reversed(value))
    return out


def _count(shapes: Shapes, prefix: str) -> int:
    """Number of distinct integer children under ``prefix`` (e.g. layers of an encoder)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in shapes if (m := pat.match(k))})


def _has(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def describe_non_checkpoint(shapes: Shapes) -> tuple[str, str]:
    """(what the file looks like, where it belongs) for a file with no UNet."""
    keys = list(shapes)
    joined = " ".join(keys[:2000])
    if any(s in joined for s in ("lora_down", "lora_up", "lora_A.", "lora_B.", "hada_w1", "lokr_w", ".lora.")):
        return "a LoRA / LyCORIS", "put it in models/Lora and use it with <lora:name:weight>"
    if any(k in shapes for k in ("string_to_param.*", "emb_params", "clip_l", "clip_g")) or \
            (0 < len(keys) <= 4 and all(len(s) == 2 for s in shapes.values())):
        return "a textual-inversion embedding", "put it in models/embeddings"
    if _has(shapes, "control_model.") or any("input_hint_block" in k or "zero_convs" in k for k in keys):
        return "a ControlNet", "put it in models/ControlNet"
    if any(k.startswith(p + "encoder.down") or k.startswith(p + "decoder.up") for p in ("", *VAE_PREFIXES)
           for k in keys) or _has(shapes, "encoder.down_blocks."):
        return "a VAE only", "put it in models/VAE and pick it as the VAE"
    if _has(shapes, "down_blocks.") and _has(shapes, "conv_in."):
        return "a diffusers-format UNet", "load the whole diffusers folder (with model_index.json) instead"
    return "not a Stable Diffusion checkpoint", "use an SD 1.x / 2.x / SDXL .safetensors checkpoint"


def read_sidecar_yaml(path: str) -> dict:
    """A1111 sidecar ``<name>.yaml``: {"prediction_type", "num_heads", "num_head_channels"} found in it."""
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    if not os.path.isfile(yaml_path):
        return {}
    import yaml
    try:
        with open(yaml_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
        params = (cfg.get("model") or {}).get("params") or {}
        unet = (params.get("unet_config") or {}).get("params") or {}
    except (yaml.YAMLError, AttributeError, OSError) as e:
        raise ModelLoadError(f"The sidecar config {yaml_path} is not valid LDM yaml ({e}).", path=yaml_path,
                             fix="fix or delete the .yaml file next to the checkpoint.") from e
    out = {"yaml_path": yaml_path}
    if params.get("parameterization") == "v":
        out["prediction_type"] = "v_prediction"
    elif "parameterization" in params:
        out["prediction_type"] = "epsilon"
    for key in ("num_heads", "num_head_channels"):
        if isinstance(unet.get(key), int) and unet[key] > 0:
            out[key] = unet[key]
    return out


def encoder_levels(shapes: Shapes, prefix: str) -> list[dict]:
    """The UNet encoder read off LDM ``input_blocks``: per level its channels ("ch"), res blocks ("res"),
    transformer depth ("depth") and linear projection ("linear"). Shared by checkpoints and ControlNets."""
    levels: list[dict] = [{"ch": None, "res": 0, "depth": 0}]
    for i in range(1, _count(shapes, prefix + "input_blocks.")):
        b = f"{prefix}input_blocks.{i}."
        if b + "0.op.weight" in shapes:  # a downsampler closes the level
            levels.append({"ch": None, "res": 0, "depth": 0})
            continue
        lvl = levels[-1]
        lvl["res"] += 1
        lvl["ch"] = shapes[b + "0.out_layers.3.weight"][0]
        if _has(shapes, b + "1.transformer_blocks."):
            lvl["depth"] = _count(shapes, b + "1.transformer_blocks.")
            lvl["linear"] = len(shapes[b + "1.proj_in.weight"]) == 2
    return levels


def unet_config(shapes: Shapes, family: Family, *, sidecar: dict | None = None,
                text_proj_dim: int | None = None, prediction: str = "epsilon") -> dict:
    """UNet2DConditionModel config from the ``model.diffusion_model.`` tensors."""
    p, sidecar = UNET, sidecar or {}
    mc, in_ch = shapes[p + "input_blocks.0.0.weight"][:2]
    levels = encoder_levels(shapes, p)
    lpb = {lv["res"] for lv in levels}
    if len(lpb) != 1:
        raise ModelLoadError(f"UNet levels have different numbers of res blocks {sorted(lpb)}; unsupported.",
                             fix="use a standard SD 1/2/XL checkpoint.")
    channels = [int(lv["ch"]) for lv in levels]
    attn = [lv["depth"] > 0 for lv in levels]
    mid_depth = _count(shapes, p + "middle_block.1.transformer_blocks.")
    if sidecar.get("num_head_channels"):
        heads = [max(1, c // sidecar["num_head_channels"]) for c in channels]
    elif sidecar.get("num_heads"):
        heads = sidecar["num_heads"]
    else:
        heads = family.attention_heads(channels)
    cfg = {
        "sample_size": family.unet_sample_size(prediction),
        "in_channels": int(in_ch), "out_channels": int(shapes[p + "out.2.weight"][0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels, "layers_per_block": lpb.pop(),
        "cross_attention_dim": int(cross_width(shapes)),
        "attention_head_dim": heads,
        "use_linear_projection": any(lv.get("linear") for lv in levels),
        "transformer_layers_per_block": [max(1, lv["depth"]) for lv in levels[:-1]] + [max(1, mid_depth)],
        "norm_num_groups": 32,
    }
    if int(mc) != channels[0]:
        raise ModelLoadError("UNet conv_in width differs from the first level; unsupported layout.",
                             fix="use a standard SD 1/2/XL checkpoint.")
    if levels[-1]["depth"] and levels[-1]["depth"] != mid_depth:
        cfg["transformer_layers_per_block"][-1] = levels[-1]["depth"]  # mid block takes the last entry
    if family.pooled:
        adm_in = int(shapes[p + "label_emb.0.0.weight"][1])
        cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm_in,
                   addition_time_embed_dim=(adm_in - int(text_proj_dim or 0)) // family.size_ids)
    return cfg


def vae_prefix(shapes: Shapes) -> str:
    for pre in (*VAE_PREFIXES, ""):
        if pre + "encoder.conv_in.weight" in shapes:
            return pre
    raise ModelLoadError("No VAE found (encoder.conv_in missing).", fix="use a complete checkpoint or VAE file.")


def vae_config(shapes: Shapes, family: Family | None, prefix: str | None = None) -> dict:
    """AutoencoderKL config from LDM VAE tensors (``encoder.down.N.block.M``...); ``family`` gives the
    native size and latent scale (None: SD 1/2's)."""
    p = vae_prefix(shapes) if prefix is None else prefix
    n = _count(shapes, p + "encoder.down.")
    channels = [int(shapes[f"{p}encoder.down.{i}.block.0.conv1.weight"][0]) for i in range(n)]
    return {
        "in_channels": int(shapes[p + "encoder.conv_in.weight"][1]),
        "out_channels": int(shapes[p + "decoder.conv_out.weight"][0]),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": _count(shapes, p + "encoder.down.0.block."),
        "latent_channels": int(shapes[p + "encoder.conv_out.weight"][0]) // 2,  # mean and logvar
        "norm_num_groups": 32, "sample_size": family.default_size if family else 512,
        "scaling_factor": family.vae_scale if family else DEFAULT_VAE_SCALE,
        "shift_factor": family.vae_shift if family else None,
        # Flux's VAE has no 1x1 convs around the latent space
        "use_quant_conv": p + "quant_conv.weight" in shapes, "use_post_quant_conv": p + "post_quant_conv.weight" in shapes,
    }


def clip_config(shapes: Shapes, prefix: str) -> dict:
    """CLIPTextConfig kwargs for HF-named CLIP weights under ``prefix`` (…``text_model.``)."""
    vocab, hidden = shapes[prefix + "embeddings.token_embedding.weight"]
    return {"vocab_size": int(vocab), "hidden_size": int(hidden),
            "intermediate_size": int(shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]),
            "num_hidden_layers": _count(shapes, prefix + "encoder.layers."),
            "num_attention_heads": max(1, int(hidden) // 64),
            "max_position_embeddings": int(shapes[prefix + "embeddings.position_embedding.weight"][0]),
            "hidden_act": "quick_gelu", "projection_dim": int(hidden),
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


def open_clip_config(shapes: Shapes, prefix: str, *, drop_last: bool) -> dict:
    """CLIPTextConfig kwargs for OpenCLIP weights. ``drop_last``: SD2 uses the penultimate layer, so
    diffusers' SD2 text encoder simply has one layer fewer."""
    vocab, width = shapes[prefix + "token_embedding.weight"]
    layers = _count(shapes, prefix + "transformer.resblocks.")
    proj = shapes.get(prefix + "text_projection")
    return {"vocab_size": int(vocab), "hidden_size": int(width),
            "intermediate_size": int(shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]),
            "num_hidden_layers": layers - 1 if drop_last else layers,
            "num_attention_heads": max(1, int(width) // 64),
            "max_position_embeddings": int(shapes[prefix + "positional_embedding"][0]),
            "hidden_act": "gelu", "projection_dim": int(proj[1]) if proj else int(width),
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The DDPM training schedule every SD 1/2/XL model shares."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False,
            "set_alpha_to_one": False, "prediction_type": prediction_type, "timestep_spacing": "leading"}
