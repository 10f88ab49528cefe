"""LoRA tensor names -> (component, layer name) and the lookup of those layer names in our loaded modules.

A layer name is model-independent: the module path with dots turned into underscores, without the
``text_model`` wrapper (transformers 5 flattens CLIPTextModel but not CLIPTextModelWithProjection). UNet
layers may be in diffusers naming (SD1/SD2 kohya, diffusers / peft files) or in the original LDM layout (SDXL
kohya: ``input_blocks_4_1_...``); ``module_index`` knows both names for every UNet module.
"""
from __future__ import annotations

import re
from typing import Any

from .. import families


# tensor-name suffix -> role; the longest match wins (so "lora_down.weight" is not read as "weight")
SUFFIX_ROLE = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "lora.down.weight": "down", "lora.up.weight": "up",                      # old diffusers LoRACompatible*
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "lora_A.weight": "down", "lora_B.weight": "up",                          # peft
    "lora_A.default.weight": "down", "lora_B.default.weight": "up",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
    "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2": "k2", "lokr_w2_a": "k2a",
    "lokr_w2_b": "k2b", "lokr_t2": "kt2",
    "diff": "diff", "diff_b": "diff_b", "w_norm": "diff", "b_norm": "diff_b",
    "dora_scale": "dora_scale", "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
}
_SUFFIXES = sorted(SUFFIX_ROLE, key=len, reverse=True)
# diffusers attention-processor LoRAs: "...attn1.processor.to_q_lora.down.weight"
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# processor LoRAs that name no module of ours (XLabs-AI's "double_blocks.0.processor.qkv_lora1.down.weight"): the
# layer keeps the processor's name and the family resolves it (``Family.lora_layer_names``)
_NAMED_PROCESSOR = re.compile(r"\.processor\.((?:qkv|proj)_lora\d?)\.(down|up)\.weight$")
# underscore-separated kohya prefixes; te1/te2 before te
_KOHYA_PREFIX = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"),
                 ("lora_te_", "te1"), ("lora_transformer_", "unet"))
# dotted prefixes of diffusers / peft files
_DOTTED_PREFIX = (("unet.", "unet"), ("transformer.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"),
                  ("base_model.model.", "unet"), ("diffusion_model.", "unet"))
# top-level module names of denoisers (UNets in both namings, DiT transformers in diffusers' and BFL's)
_UNET_TOP = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block",
             "conv_in", "conv_out", "time_embedding", "transformer_blocks", "single_transformer_blocks",
             "double_blocks", "single_blocks", "x_embedder", "context_embedder", "proj_out", "norm_out",
             "time_text_embed", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


def split_key(key: str) -> tuple[str, str, str, bool] | None:
    """``(component, layer, role, dotted)`` for one tensor name, or None if it is not a known LoRA tensor."""
    if m := _PROCESSOR.search(key):
        target = "to_out.0" if m.group(1) == "to_out" else m.group(1)
        base, role = key[:m.start()] + "." + target, m.group(2)
    elif m := _NAMED_PROCESSOR.search(key):
        base, role = key[:m.end(1)], m.group(2)
    else:
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            return None
        base, role = key[: -len(suffix) - 1], SUFFIX_ROLE[suffix]
    for prefix, comp in _KOHYA_PREFIX:
        if base.startswith(prefix):
            return comp, _norm(base[len(prefix):], comp), role, False
    for prefix, comp in _DOTTED_PREFIX:
        if base.startswith(prefix):
            rest = base[len(prefix):]
            if prefix == "base_model.model." and not rest.startswith(_UNET_TOP):
                comp = "te1"
            return comp, _norm(rest.replace(".", "_"), comp), role, True
    if base.startswith(_UNET_TOP):  # unet.save_attn_procs() files have no prefix
        return "unet", _norm(base.replace(".", "_"), "unet"), role, True
    return None


def _norm(name: str, comp: str) -> str:
    if comp != "unet":
        return name.removeprefix("text_model_")
    return name.removeprefix("model_diffusion_model_")


def _weighted_modules(module) -> list[tuple[str, Any]]:
    import torch
    return [(n, m) for n, m in module.named_modules()
            if isinstance(getattr(m, "weight", None), torch.nn.Parameter)]


def module_index(components) -> dict[str, dict[str, Any]]:
    """component id -> {layer name: torch module} for every module with a weight: the denoiser in diffusers
    naming plus the names the family's own files use (``Family.lora_layer_names``), each text encoder under the
    id its family gives it."""
    out: dict[str, dict[str, Any]] = {}
    unet = getattr(components, "unet", None)
    spec = components.spec
    if unet is not None:
        idx: dict[str, Any] = {name.replace(".", "_"): mod for name, mod in _weighted_modules(unet)}
        for name, target in spec.lora_layer_names(unet).items():
            idx.setdefault(name, target)
        out["unet"] = idx
    for te_spec in spec.text_encoders:
        te = getattr(components, te_spec.attr, None)
        if te is not None:
            out[te_spec.lora_id] = {n.removeprefix("text_model.").replace(".", "_"): m
                                    for n, m in _weighted_modules(te)}
    return out


class FusedLayer:
    """A layer files name as one fused module (FLUX's ``img_attn.qkv``) that is several modules here:
    ``parts`` [(module, first row, end row)]. ``weight.shape`` is the fused one, for the fit check."""

    def __init__(self, parts: list[tuple[Any, int, int]]):
        import torch
        self.parts = parts
        first = parts[0][0].weight
        self.weight = torch.empty((parts[-1][2], *first.shape[1:]), device="meta")
        self.bias = None


# ---- family hints ----------------------------------------------------------------------------------------------
def family_from_metadata(meta: dict) -> str | None:
    """Family named by kohya's ``ss_base_model_version`` / ``modelspec.architecture`` / ``ss_v2`` (or None)."""
    for key in ("ss_base_model_version", "modelspec.architecture"):
        fam = families.from_version(str(meta.get(key) or ""))
        if fam is not None:
            return fam.name
    if str(meta.get("ss_v2", "")).lower() == "true":
        return next((f.name for f in families.all_families() if f.kohya_v2), None)
    return None


def family_from_shapes(shapes: dict[str, tuple]) -> str | None:
    """Family from tensor names and widths (header shapes are enough): which text encoders have layers, the
    UNet's cross-attention input width and the text encoders' widths (see ``Family.lora_score``)."""
    encoders: set[str] = set()
    tops: set[str] = set()
    all_tops = families.lora_tops()
    cross = None
    widths: dict[str, int] = {}
    for key, shape in shapes.items():
        parsed = split_key(key)
        if parsed is None:
            continue
        comp, layer, role, _ = parsed
        if comp != "unet":
            encoders.add(comp)
        else:
            top = next((t for t in all_tops if layer.startswith(t)), None)
            if top is not None:
                tops.add(top)
        if role not in ("down", "w1b", "diff") or len(shape) < 2:
            continue
        if comp == "unet" and layer.endswith("attn2_to_k"):
            cross = int(shape[1])
        elif comp != "unet" and layer.endswith("mlp_fc1"):
            widths[comp] = int(shape[1])
    fam = families.from_lora(encoders, cross, widths, frozenset(tops))
    return fam.name if fam else None


def family_hint(meta: dict, shapes: dict[str, tuple]) -> str | None:
    return family_from_metadata(meta) or family_from_shapes(shapes)
