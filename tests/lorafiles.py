"""Seeded random LoRA / LyCORIS / embedding files for the tiny models, with the ΔW each one should add.

Every builder returns ``(tensors, expected)`` where ``expected[(attr, module_path)]`` is the weight delta at
user weight 1 (``(attr, module_path, "bias")`` for bias deltas), computed here with plain formulas written
independently of studio.adapters (loops over kernel positions, einsum for Kronecker products).
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from studio.loading.ldm_export import UNET_RESNET, UNET_TOP, _map_key, _unet_prefix_map


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(g, *shape, scale=0.1):
    return torch.randn(*shape, generator=g) * scale


def unet_targets(c, conv=True):
    """(path, module) of the UNet layers LoRAs usually touch; 3x3 convs only with ``conv``."""
    out = []
    for n, m in c.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and ".attentions." in n:
            out.append((n, m))
        elif isinstance(m, torch.nn.Conv2d) and ".attentions." in n:   # SD1's 1x1 proj_in / proj_out
            out.append((n, m))
        elif conv and isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and \
                (".resnets." in n or "samplers" in n):
            out.append((n, m))
    return out


def te_targets(te):
    return [(n.removeprefix("text_model."), m) for n, m in te.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n]


def kohya_name(c, attr, path):
    """kohya's tensor-name stem for one of our modules."""
    if attr == "unet":
        if c.family.startswith("sdxl"):  # SDXL kohya files use the LDM layout
            prefixes = {**UNET_TOP, **_unet_prefix_map(c.unet.config)}
            path = _map_key(path + ".", prefixes, UNET_RESNET)[:-1]
        return "lora_unet_" + path.replace(".", "_")
    prefix = "lora_te_" if c.family in ("sd1", "sd2") else ("lora_te1_" if attr == "text_encoder" else "lora_te2_")
    return prefix + "text_model_" + path.replace(".", "_")


def all_targets(c, conv=True, te=True):
    out = [("unet", p, m) for p, m in unet_targets(c, conv)]
    if te:
        for attr in ("text_encoder", "text_encoder_2"):
            if getattr(c, attr) is not None:
                out += [(attr, p, m) for p, m in te_targets(getattr(c, attr))]
    return out


# ---- LoRA (kohya), LoCon, Tucker, DoRA -------------------------------------------------------------------------
def kohya_lora(c, seed=0, rank=4, alpha=2.0, conv=True, te=True, dtype=torch.float32, dora=False):
    """kohya LoRA: lora_down / lora_up / alpha. ``alpha=None`` leaves it out (alpha = rank)."""
    g, sd, exp = _gen(seed), {}, {}
    for attr, path, m in all_targets(c, conv, te):
        w = m.weight
        out_, in_ = w.shape[:2]
        kernel = tuple(w.shape[2:])
        down = _rand(g, rank, in_, *kernel).to(dtype)
        up = _rand(g, out_, rank, *([1] * len(kernel))).to(dtype)
        stem = kohya_name(c, attr, path)
        sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = down, up
        if alpha is not None:
            sd[stem + ".alpha"] = torch.tensor(float(alpha))
        scale = (alpha / rank) if alpha else 1.0
        delta = (up.float().reshape(out_, rank) @ down.float().reshape(rank, -1)).reshape(w.shape) * scale
        if dora and not kernel:
            on_out = len(exp) % 2 == 1
            ds = (torch.rand(out_, 1, generator=g) if on_out else torch.rand(1, in_, generator=g)) + 0.5
            sd[stem + ".dora_scale"] = ds
            merged = w.detach().float() + delta
            norm = merged.norm(dim=1, keepdim=True) if on_out else merged.norm(dim=0, keepdim=True)
            delta = merged * ds / norm - w.detach().float()
        exp[(attr, path)] = delta
    return sd, exp


def locon_tucker(c, seed=0, rank=4, alpha=4.0):
    """LoCon with Tucker cores (lora_mid) on every 3x3 conv; plain LoRA elsewhere."""
    g, sd, exp = _gen(seed), {}, {}
    for attr, path, m in all_targets(c, conv=True, te=False):
        w = m.weight
        stem = kohya_name(c, attr, path)
        if w.ndim == 4 and w.shape[-1] == 3:
            down, mid = _rand(g, rank, w.shape[1], 1, 1), _rand(g, rank, rank, 3, 3)
            up = _rand(g, w.shape[0], rank, 1, 1)
            sd[stem + ".lora_mid.weight"] = mid
            delta = torch.zeros(w.shape)
            for y in range(3):
                for x in range(3):
                    delta[:, :, y, x] = up[:, :, 0, 0] @ mid[:, :, y, x] @ down[:, :, 0, 0]
        else:
            kernel = tuple(w.shape[2:])
            down, up = _rand(g, rank, w.shape[1], *kernel), _rand(g, w.shape[0], rank, *([1] * len(kernel)))
            delta = (up.reshape(w.shape[0], rank) @ down.reshape(rank, -1)).reshape(w.shape)
        sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = down, up
        sd[stem + ".alpha"] = torch.tensor(alpha)
        exp[(attr, path)] = delta * alpha / rank
    return sd, exp


# ---- LyCORIS LoHa / LoKr / full ----------------------------------------------------------------------------------
def loha(c, seed=0, rank=4, alpha=2.0, tucker=True):
    """LoHa: hada_w1_a/b, hada_w2_a/b (+ hada_t1/t2 cores on 3x3 convs when ``tucker``)."""
    g, sd, exp = _gen(seed), {}, {}
    for attr, path, m in all_targets(c, conv=True, te=True):
        w = m.weight
        out_, in_ = w.shape[:2]
        stem = kohya_name(c, attr, path)
        if tucker and w.ndim == 4 and w.shape[-1] == 3:
            parts = []
            for i in (1, 2):
                t, a, b = _rand(g, rank, rank, 3, 3), _rand(g, rank, out_), _rand(g, rank, in_)
                sd.update({f"{stem}.hada_t{i}": t, f"{stem}.hada_w{i}_a": a, f"{stem}.hada_w{i}_b": b})
                d = torch.zeros(w.shape)
                for y in range(3):
                    for x in range(3):
                        d[:, :, y, x] = a.T @ t[:, :, y, x] @ b
                parts.append(d)
            delta = parts[0] * parts[1]
        else:
            flat = w[0].numel()
            a1, b1, a2, b2 = _rand(g, out_, rank), _rand(g, rank, flat), _rand(g, out_, rank), _rand(g, rank, flat)
            sd.update({f"{stem}.hada_w1_a": a1, f"{stem}.hada_w1_b": b1, f"{stem}.hada_w2_a": a2,
                       f"{stem}.hada_w2_b": b2})
            delta = ((a1 @ b1) * (a2 @ b2)).reshape(w.shape)
        sd[stem + ".alpha"] = torch.tensor(alpha)
        exp[(attr, path)] = delta * alpha / rank
    return sd, exp


def _factor(n):
    return next((f for f in (4, 2, 3, 5) if n % f == 0 and n > f), 1)


def _kron(a, b):
    k = torch.einsum("ab,cd...->acbd...", a, b)
    return k.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:])


def lokr(c, seed=0, rank=2, alpha=1.0):
    """LoKr: unet linears lokr_w1 + lokr_w2_a/b, text encoders lokr_w1_a/b + lokr_w2, 3x3 convs w1 + full 4-D w2."""
    g, sd, exp = _gen(seed), {}, {}
    for attr, path, m in all_targets(c, conv=True, te=True):
        w = m.weight
        out_, in_ = w.shape[:2]
        a, b = _factor(out_), _factor(in_)
        cc, d = out_ // a, in_ // b
        stem = kohya_name(c, attr, path)
        scale = 1.0
        if w.ndim == 4 and w.shape[-1] == 3:
            w1, w2 = _rand(g, a, b), _rand(g, cc, d, 3, 3)
            sd.update({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2})
        elif attr == "unet":
            w1, w2a, w2b = _rand(g, a, b), _rand(g, cc, rank), _rand(g, rank, d)
            sd.update({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b})
            w2, scale = w2a @ w2b, alpha / rank
        else:
            w1a, w1b, w2 = _rand(g, a, rank), _rand(g, rank, b), _rand(g, cc, d)
            sd.update({f"{stem}.lokr_w1_a": w1a, f"{stem}.lokr_w1_b": w1b, f"{stem}.lokr_w2": w2})
            w1, scale = w1a @ w1b, alpha / rank
        sd[stem + ".alpha"] = torch.tensor(alpha)
        exp[(attr, path)] = _kron(w1, w2).reshape(w.shape) * scale
    return sd, exp


def full_diff(c, seed=0):
    """Full ``diff`` / ``diff_b`` per layer."""
    g, sd, exp = _gen(seed), {}, {}
    for attr, path, m in all_targets(c, conv=True, te=True):
        stem = kohya_name(c, attr, path)
        sd[stem + ".diff"] = diff = _rand(g, *m.weight.shape, scale=0.01)
        exp[(attr, path)] = diff
        if m.bias is not None:
            sd[stem + ".diff_b"] = db = _rand(g, *m.bias.shape, scale=0.01)
            exp[(attr, path, "bias")] = db
    return sd, exp


# ---- diffusers / peft --------------------------------------------------------------------------------------------
def diffusers_lora(c, seed=0, rank=4, style="peft"):
    """diffusers files: ``unet.<path>.lora_A/B.weight`` (peft) or ``.lora.down/up.weight`` (old); alpha = rank."""
    g, sd, exp = _gen(seed), {}, {}
    a_name, b_name = ("lora_A.weight", "lora_B.weight") if style == "peft" else ("lora.down.weight", "lora.up.weight")
    for attr, path, m in all_targets(c, conv=False, te=True):
        w = m.weight
        kernel = tuple(w.shape[2:])
        down, up = _rand(g, rank, w.shape[1], *kernel), _rand(g, w.shape[0], rank, *([1] * len(kernel)))
        stem = f"unet.{path}" if attr == "unet" else f"{attr}.text_model.{path}"
        sd[f"{stem}.{a_name}"], sd[f"{stem}.{b_name}"] = down, up
        exp[(attr, path)] = (up.reshape(w.shape[0], rank) @ down.reshape(rank, -1)).reshape(w.shape)
    return sd, exp


BUILDERS = {"kohya": kohya_lora, "locon_tucker": locon_tucker, "loha": loha, "lokr": lokr, "full": full_diff,
            "diffusers": diffusers_lora, "dora": lambda c, seed=0: kohya_lora(c, seed, dora=True, conv=False)}


def metadata_for(c, **extra) -> dict[str, str]:
    base = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[c.family]
    meta = {"ss_base_model_version": base, "ss_network_module": "networks.lora"}
    meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra.items()})
    return meta


def write(path, tensors, metadata=None):
    """Write a .safetensors (or a weights-only .pt for a ``.pt`` path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    else:
        torch.save(tensors, str(path))
    return path
