"""Where each LoRA layer lives in an LDM-layout checkpoint, and what kohya calls it.

Layer names follow studio/adapters/keys.py: module path with dots turned into underscores, text-encoder names
without the ``text_model_`` wrapper, UNet names in diffusers naming (``down_blocks_0_attentions_0_...``, what
SD1/SD2 kohya files use) or LDM naming (``input_blocks_1_1_...``, SDXL kohya). The map is built forward from
the checkpoint's own keys, so the underscore names never have to be parsed back. OpenCLIP text encoders (SD2,
SDXL bigG) fuse q/k/v into one ``in_proj_weight``: each of q/k/v is a row slice of it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .. import families
from ..loading.ldm_config import UNET

OPENCLIP_RENAMES = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}
_TE_TARGET = re.compile(r"^encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")


@dataclass(frozen=True)
class LayerTarget:
    comp: str                       # unet | te1 | te2
    name: str                       # LDM-naming layer name (UNet) or HF CLIP layer name (text encoders)
    alt: str | None                 # the diffusers-naming UNet name
    key: str                        # checkpoint weight key
    rows: tuple[int, int] | None    # row slice of a fused in_proj weight
    bias: str | None                # checkpoint bias key (same rows), if present
    shape: tuple[int, ...]          # shape of this layer's weight (after slicing)

    def kohya(self, family: str) -> str:
        """kohya tensor-name stem (UNet in diffusers naming, or LDM naming where the family's kohya files use it)."""
        spec = families.get(family)
        if self.comp == "unet":
            use_ldm = spec.kohya_unet_ldm_names or self.alt is None
            return "lora_unet_" + (self.name if use_ldm else self.alt)
        return kohya_te_prefix(family, self.comp) + "text_model_" + self.name

    def is_default_target(self, conv: bool) -> bool:
        """kohya's LoRA targets: transformer linears + proj_in/out, text-encoder attention/MLP; with ``conv``
        also the 3x3 convs of resnets and down/up samplers (LoCon)."""
        if self.comp != "unet":
            return bool(_TE_TARGET.match(self.name))
        if "transformer_blocks" in self.name and len(self.shape) == 2 and "norm" not in self.name:
            return True
        if self.name.endswith(("proj_in", "proj_out")):
            return True
        if conv and len(self.shape) == 4 and self.shape[2:] == (3, 3):
            return not (self.name.startswith(("input_blocks_0_", "out_")))  # conv_in / conv_out: not in blocks
        return False


def kohya_te_prefix(family: str | None, comp: str) -> str:
    """``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoder ``comp`` ("te1", "te2") of ``family``
    (unknown: kohya's single-encoder prefix)."""
    spec = families.get(family)
    te = spec.encoder_by_lora_id(comp) if spec else None
    return te.kohya_prefix if te else "lora_te_"


def _unet_inverse(shapes, family: str):
    """LDM module prefix -> diffusers module prefix (and resnet renames) for this checkpoint's UNet."""
    from ..loading.ldm_config import unet_config
    from ..loading.ldm_export import UNET_RESNET, UNET_TOP, _unet_prefix_map
    cfg = unet_config(shapes, families.get(family))
    inv: dict[str, str] = {}
    for diff, ldm in {**UNET_TOP, **_unet_prefix_map(cfg)}.items():
        if "class_embedding" in diff and families.get(family).pooled:
            continue  # a pooled family's label_emb is diffusers' add_embedding
        inv.setdefault(ldm, diff)
    return inv, [(ldm, diff) for diff, ldm in UNET_RESNET]


def _to_diffusers(module: str, inv, resnet) -> str | None:
    path = module + "."
    best = max((p for p in inv if path.startswith(p)), key=len, default=None)
    if best is None:
        return None
    rest, diff = path[len(best):], inv[best]
    if ".resnets." in diff:
        for ldm, new in resnet:
            if rest.startswith(ldm + "."):
                rest = new + rest[len(ldm):]
                break
    return (diff + rest)[:-1]


def checkpoint_layers(shapes: dict, family: str) -> list[LayerTarget]:
    """Every weight of ``shapes`` (an LDM checkpoint) a LoRA could adapt, in key order."""
    out: list[LayerTarget] = []
    inv, resnet = _unet_inverse(shapes, family)
    te_prefixes = [(te.lora_id, te.ldm_prefix, te.kind == "open_clip")
                   for te in families.get(family).text_encoders]
    for key, shape in shapes.items():
        shape = tuple(shape)
        if key.startswith(UNET) and key.endswith(".weight") and len(shape) >= 2:
            module = key[len(UNET):-len(".weight")]
            alt = _to_diffusers(module, inv, resnet)
            bias = key[:-len("weight")] + "bias"
            out.append(LayerTarget("unet", module.replace(".", "_"), alt.replace(".", "_") if alt else None, key,
                                   None, bias if bias in shapes else None, shape))
            continue
        for comp, prefix, openclip in te_prefixes:
            if not key.startswith(prefix) or len(shape) < 2:
                continue
            module = key[len(prefix):]
            if not openclip:
                if module.endswith(".weight"):
                    bias = key[:-len("weight")] + "bias"
                    out.append(LayerTarget(comp, module[:-7].replace(".", "_"), None, key, None,
                                           bias if bias in shapes else None, shape))
            else:
                out.extend(_openclip(comp, prefix, module, key, shape, shapes))
    return out


def _openclip(comp, prefix, module, key, shape, shapes) -> list[LayerTarget]:
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", module)
    if module == "token_embedding.weight":
        return [LayerTarget(comp, "embeddings_token_embedding", None, key, None, None, shape)]
    if not m:
        return []
    layer, rest = m.group(1), m.group(2)
    base = f"encoder_layers_{layer}_"
    if rest == "attn.in_proj_weight":
        d = shape[0] // 3
        bias = prefix + f"transformer.resblocks.{layer}.attn.in_proj_bias"
        return [LayerTarget(comp, f"{base}self_attn_{q}_proj", None, key, (i * d, (i + 1) * d),
                            bias if bias in shapes else None, (d, *shape[1:])) for i, q in enumerate("qkv")]
    for old, new in OPENCLIP_RENAMES.items():
        if rest == old + ".weight":
            bias = key[:-len("weight")] + "bias"
            return [LayerTarget(comp, base + new, None, key, None, bias if bias in shapes else None, shape)]
    return []


def layer_index(layers: list[LayerTarget]) -> dict[tuple[str, str], LayerTarget]:
    """(component, layer name) -> target, with both namings for UNet layers (as module_index does)."""
    idx: dict[tuple[str, str], LayerTarget] = {}
    for lt in layers:
        idx[(lt.comp, lt.name)] = lt
        if lt.alt:
            idx.setdefault((lt.comp, lt.alt), lt)
    return idx


def last_openclip_block(shapes: dict, family: str) -> str | None:
    """An OpenCLIP block a family never reads (SD2's last: penultimate-layer conditioning): extraction skips it."""
    te = next((te for te in families.get(family).text_encoders if te.drop_last), None)
    if te is None:
        return None
    pat = re.compile(re.escape(te.ldm_prefix) + r"transformer\.resblocks\.(\d+)\.")
    n = max((int(m.group(1)) for k in shapes if (m := pat.match(k))), default=None)
    return None if n is None else f"encoder_layers_{n}_"
