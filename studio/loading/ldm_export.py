"""diffusers components -> one LDM-layout (A1111 single-file) state dict, and writing it as safetensors.

Own mapping, general over the number of levels and layers per block. Used to write test checkpoints and by
the merge feature. SD2: diffusers' text encoder lacks the last OpenCLIP block (SD2 conditions on the
penultimate layer); the export re-creates it as a COPY of the previous block so the file has the usual layout.
Nothing reads that block (the loader drops it again, A1111 runs "penultimate"), so round trips are exact.
"""
from __future__ import annotations

import os

from ..lazy import torch
from .components import Components
from .ldm_config import UNET

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
            "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
            "class_embedding.linear_1.": "label_emb.0.0.", "class_embedding.linear_2.": "label_emb.0.2."}


def _unet_prefix_map(config) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for every resnet/attention/sampler of the UNet."""
    lpb = config["layers_per_block"]
    n = len(config["block_out_channels"])
    m, idx = {}, 1
    for i in range(n):
        for j in range(lpb):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{idx}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{idx}.1."
            idx += 1
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{idx}.0.op."
            idx += 1
    m.update({"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
              "mid_block.resnets.1.": "middle_block.2."})
    idx = 0
    for i, kind in enumerate(config["up_block_types"]):
        for j in range(lpb + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{idx}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{idx}.1."
            if j == lpb and i < n - 1:  # the upsampler sits after the attention, if the level has one
                pos = 2 if "CrossAttn" in kind else 1
                m[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{idx}.{pos}.conv."
            idx += 1
    return m


def _map_key(key: str, prefixes: dict[str, str], resnet_renames=()) -> str:
    for old in sorted((p for p in prefixes if key.startswith(p)), key=len, reverse=True)[:1]:
        rest = key[len(old):]
        if ".resnets." in old:
            for a, b in resnet_renames:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
        return prefixes[old] + rest
    raise KeyError(key)


def unet_to_ldm(state: dict, config) -> dict:
    """diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.`` keys."""
    prefixes = {**UNET_TOP, **_unet_prefix_map(config)}
    return {UNET + _map_key(k, prefixes, UNET_RESNET): v for k, v in state.items()}


def vae_to_ldm(state: dict, prefix: str = "first_stage_model.") -> dict:
    """diffusers AutoencoderKL state dict -> LDM VAE keys (mid attention as 1x1 convs, like LDM stores it)."""
    n = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    m = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
         "encoder.conv_in.": "encoder.conv_in.", "encoder.conv_out.": "encoder.conv_out.",
         "decoder.conv_in.": "decoder.conv_in.", "decoder.conv_out.": "decoder.conv_out.",
         "quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        m[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        m[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(n):
        m[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        m[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."   # LDM counts up-levels upward
        m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for k, v in state.items():
        new = _map_key(k, m).replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in new:
            head, tail = new.split(".mid.attn_1.")
            tail = next((b + tail[len(a):] for a, b in attn.items() if tail.startswith(a)), tail)
            new = f"{head}.mid.attn_1.{tail}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        out[prefix + new] = v.contiguous()
    return out


def _text_state(model) -> dict:
    """Text-model state with the ``text_model.`` wrapper stripped (transformers 5 layouts differ per class)."""
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


def clip_to_ldm(model, prefix: str) -> dict:
    """CLIPTextModel -> HF-named LDM keys under ``prefix`` (…``transformer.text_model.``)."""
    return {prefix + k: v for k, v in _text_state(model).items()}


def open_clip_to_ldm(model, prefix: str, *, recreate_last: bool) -> dict:
    """CLIPTextModel(WithProjection) -> OpenCLIP keys (fused in_proj, positional_embedding, ln_final…)."""
    s = _text_state(model)
    out = {prefix + "token_embedding.weight": s["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": s["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": s["final_layer_norm.weight"],
           prefix + "ln_final.bias": s["final_layer_norm.bias"]}
    n = model.config.num_hidden_layers
    names = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
             "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([s[src + f"self_attn.{q}_proj.{kind}"]
                                                           for q in "qkv"])
        for a, b in names.items():
            for kind in ("weight", "bias"):
                out[dst + b + kind] = s[src + a + kind]
    if recreate_last:  # see module docstring
        last, new = f"{prefix}transformer.resblocks.{n - 1}.", f"{prefix}transformer.resblocks.{n}."
        out.update({new + k[len(last):]: v.clone() for k, v in list(out.items()) if k.startswith(last)})
    if "text_projection.weight" in model.state_dict():
        out[prefix + "text_projection"] = model.state_dict()["text_projection.weight"].T.contiguous()
    else:  # SD2: unused by diffusers; identity keeps the usual layout
        dtype = out[prefix + "ln_final.weight"].dtype
        out[prefix + "text_projection"] = torch.eye(model.config.hidden_size, dtype=dtype)
    return out


def components_to_ldm(c: Components) -> dict[str, torch.Tensor]:
    """The whole checkpoint as one LDM-layout state dict (tensors are shared with the modules, not copied)."""
    sd = unet_to_ldm(c.unet.state_dict(), c.unet.config)
    sd.update(vae_to_ldm(c.vae.state_dict()))
    for te in c.spec.text_encoders:
        model = getattr(c, te.attr)
        if te.kind == "clip":
            sd.update(clip_to_ldm(model, te.ldm_prefix))
        else:
            sd.update(open_clip_to_ldm(model, te.ldm_prefix, recreate_last=te.drop_last))
    return sd


def save_ldm_single_file(components: Components, path, *, dtype=None, metadata: dict | None = None) -> str:
    """Write ``components`` as an A1111-style .safetensors checkpoint (atomically: temp file then rename)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    sd = components_to_ldm(components)
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu()
        if v.data_ptr() in seen:  # safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v.contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(out, tmp, metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)
    return path
