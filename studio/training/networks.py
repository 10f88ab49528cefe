"""What is trained: peft adapters (LoRA / LoCon / LoHa / LoKr) injected into the UNet / text encoder in place,
new token rows of the text encoder's embedding (Textual Inversion), or a whole ControlNet beside the frozen UNet.

Injection keeps every module its own class, so diffusers pipelines over the same modules sample with the
training weights (no reload) and the loaders keep working.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig

ADAPTER = "default"
# the layers kohya's LoRA targets (transformer blocks: attention, feed-forward, proj_in / proj_out)
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
ATTN_ONLY = ("to_q", "to_k", "to_v", "to_out.0")   # diffusers' LoRA examples
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_CONV = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)|downsamplers\.0\.conv|upsamplers\.0\.conv)$")


def conv_targets(unet) -> list[str]:
    """The resnet / sampler convs LoCon adds (kohya's ResnetBlock2D, Downsample2D, Upsample2D)."""
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and _CONV.search(n)]


def _attn_targets(unet, which: str = "transformer") -> list[str]:
    if which == "attention":
        return [n for n, _ in unet.named_modules() if n.endswith(tuple("." + t for t in ATTN_ONLY))]
    return [n for n, _ in unet.named_modules() if any(n.endswith("." + t) for t in UNET_ATTN)
            and "transformer_blocks" in n or n.endswith((".proj_in", ".proj_out")) and "attentions" in n]


def peft_config(cfg: TrainConfig, targets: list[str], convs: list[str]):
    """peft config for ``cfg.method`` over explicit module names; convs get their own rank / alpha."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    names = targets + convs
    rank_pattern = {re.escape(n): cfg.conv_rank or cfg.rank for n in convs}
    alpha_pattern = {re.escape(n): cfg.conv_alpha if cfg.conv_rank else cfg.alpha for n in convs}
    if cfg.method in ("lora", "locon", "dreambooth_lora"):
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=names, rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern, init_lora_weights=True)
    cls = LoHaConfig if cfg.method == "loha" else LoKrConfig
    return cls(r=cfg.rank, alpha=cfg.alpha, target_modules=names, rank_pattern=rank_pattern,
               alpha_pattern=alpha_pattern)


@dataclass
class Network:
    """The trainable part of a run and how to save / restore it exactly."""

    method: str
    modules: dict[str, Any]                                   # "unet" / "text_encoder" -> injected model
    params: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)
    ti_ids: list[int] = field(default_factory=list)           # new token ids (TI)
    ti_tokens: list[str] = field(default_factory=list)
    ti_orig: torch.Tensor | None = None                       # embedding rows to restore after each step

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Exactly what is learnt (adapter tensors or the new embedding rows), detached on the CPU."""
        if self.method == "textual_inversion":
            emb = self.modules["text_encoder"].get_input_embeddings().weight
            return {"ti_rows": emb[self.ti_ids].detach().float().cpu().clone()}
        out = {}
        for part, model in self.modules.items():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    out[f"{part}.{name}"] = p.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.method == "textual_inversion":
            emb = self.modules["text_encoder"].get_input_embeddings().weight
            emb[self.ti_ids] = state["ti_rows"].to(device=emb.device, dtype=emb.dtype)
            return
        for part, model in self.modules.items():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(state[f"{part}.{name}"].to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def after_step(self) -> None:
        """TI: every row but the new tokens' goes back to its original value (weight decay touches them)."""
        if self.method == "textual_inversion" and self.ti_orig is not None:
            emb = self.modules["text_encoder"].get_input_embeddings().weight
            keep = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
            keep[self.ti_ids] = False
            emb[keep] = self.ti_orig[keep].to(emb.device, emb.dtype)


def build_network(cfg: TrainConfig, components) -> Network:
    """Freeze the base model and add what ``cfg.method`` trains."""
    for m in components.modules().values():
        m.requires_grad_(False)
    if cfg.is_ti:
        return _textual_inversion(cfg, components)
    if cfg.is_controlnet:
        return _controlnet(cfg, components)
    from peft import inject_adapter_in_model

    net = Network(cfg.method, {})
    spec = components.spec
    if cfg.train_unet:
        unet = components.unet
        targets = spec.lora_train_targets(unet, cfg.unet_targets)
        if targets is None:
            targets = _attn_targets(unet, cfg.unet_targets)
            convs = conv_targets(unet) if cfg.method == "locon" or (
                cfg.conv_rank and cfg.method not in ("lora", "dreambooth_lora")) else []
        else:
            convs = []    # a DiT has no convolutions in its blocks
        inject_adapter_in_model(peft_config(cfg, targets, convs), unet, adapter_name=ADAPTER)
        net.modules["unet"] = unet
    if cfg.train_text_encoder:
        # the CLIP encoders (kohya trains T5 only on request, and its layers have other names)
        for te_spec in spec.text_encoders:
            te = getattr(components, te_spec.attr, None)
            if te is None or te_spec.kind not in ("clip", "open_clip"):
                continue
            targets = [n for n, _ in te.named_modules() if n.endswith(tuple("." + t for t in TE_TARGETS))]
            inject_adapter_in_model(peft_config(cfg, targets, []), te, adapter_name=ADAPTER)
            net.modules[te_spec.attr] = te
    for part, model in net.modules.items():
        # inject marks only the adapter tensors trainable; keep everything else frozen explicitly
        net.params[part] = [p for n, p in model.named_parameters() if p.requires_grad]
    return net


def ti_token_strings(token: str, n: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _textual_inversion(cfg: TrainConfig, components) -> Network:
    from ..errors import StudioError

    tok, te = components.tokenizer, components.text_encoder
    tokens = ti_token_strings(cfg.token, cfg.num_vectors)
    if tok.add_tokens(tokens) != len(tokens):
        raise StudioError(f"The token {cfg.token!r} is already a word of the tokenizer.", field="textual_inversion.token",
                          fix="pick a made-up word, e.g. 'myth-style'")
    init_ids = tok.encode(cfg.init_word, add_special_tokens=False)
    if not init_ids:
        raise StudioError(f"init_word {cfg.init_word!r} gives no tokens.", field="textual_inversion.init_word",
                          fix="use an ordinary word")
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    ids = tok.convert_tokens_to_ids(tokens)
    emb = te.get_input_embeddings()
    with torch.no_grad():
        for i, tid in enumerate(ids):
            emb.weight[tid] = emb.weight[init_ids[i % len(init_ids)]]
    emb.weight.requires_grad_(True)
    return Network("textual_inversion", {"text_encoder": te}, {"text_encoder": [emb.weight]}, ids, tokens,
                   emb.weight.detach().clone())


def _controlnet(cfg: TrainConfig, components) -> Network:
    """A ControlNet to train: the base UNet's encoder copied with zero convolutions (diffusers'
    ``ControlNetModel.from_unet``), or the ControlNet named by ``controlnet_init`` to go on from."""
    from diffusers import ControlNetModel

    from ..controlnet.models import check_family, load_controlnet
    unet = components.unet
    if cfg.controlnet_init:
        add_dim = getattr(unet.config, "addition_time_embed_dim", None)
        cn, family = load_controlnet(cfg.controlnet_init, dtype=unet.dtype, device=unet.device,
                                     addition_time_embed_dim=add_dim)
        check_family(family, components.family, (Path(cfg.controlnet_init).name, Path(cfg.base_model).name),
                     field="controlnet.controlnet_init")
    else:
        cn = ControlNetModel.from_unet(unet, conditioning_channels=3)
    cn.to(device=unet.device).requires_grad_(True)
    cn.train()
    return Network("controlnet", {"controlnet": cn}, {"controlnet": list(cn.parameters())})


def with_ti_tokens(caption: str, net: Network, token: str) -> str:
    """Put the token (expanded to its vectors) into a caption that does not name it yet."""
    expanded = " ".join(net.ti_tokens)
    if token in caption.split() or token in [t.strip() for t in caption.split(",")]:
        return re.sub(rf"(?<![\w-]){re.escape(token)}(?![\w-])", expanded, caption)
    return f"{expanded}, {caption}" if caption else expanded
