"""One adapted layer of a LoRA / LyCORIS file and the weight delta it adds (formulas: reference/formats.md).

All maths runs in float32 on the device of the weight being patched. ``weight_delta`` returns ΔW already
scaled by alpha / rank (not by the user weight: that is the patcher's job). DoRA layers need the original
weight: the result is then ``dora_scale * (W + ΔW) / ||W + ΔW|| - W`` (LyCORIS / ComfyUI: the user weight
scales that difference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..lazy import torch

# roles each kind needs (besides optional alpha / dora_scale / diff_b / tucker cores)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker / CP rebuild as LyCORIS stores it: core t [r, r, kh, kw], wa [r, out], wb [r, in]."""
    a = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", a, wa)


def kind_of(roles: set[str]) -> str | None:
    """Which algorithm a layer uses, from the roles of its tensors (None: incomplete / not understood)."""
    if {"down", "up"} <= roles:
        return "lora"
    if {"w1a", "w1b", "w2a", "w2b"} <= roles:
        return "loha"
    if ("k1" in roles or {"k1a", "k1b"} <= roles) and ("k2" in roles or {"k2a", "k2b"} <= roles):
        return "lokr"
    if "diff" in roles or "diff_b" in roles:
        return "full"
    return None


@dataclass
class LayerDelta:
    """The tensors of one layer (role -> tensor, as stored in the file) and its alpha."""

    kind: str                                   # "lora" | "loha" | "lokr" | "full"
    t: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None

    @property
    def dora_scale(self) -> torch.Tensor | None:
        return self.t.get("dora_scale")

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.t.values())

    @property
    def rank(self) -> int | None:
        if self.kind == "lora":
            return self.t["down"].shape[0]
        if self.kind == "loha":
            return self.t["w1b"].shape[0]
        if self.kind == "lokr":
            for role in ("k1b", "k2b"):
                if role in self.t:
                    return self.t[role].shape[0]
        return None

    def scale(self) -> float:
        """alpha / rank; alpha missing or 0 means alpha = rank (scale 1)."""
        r = self.rank
        if not self.alpha or not r:
            return 1.0
        return float(self.alpha) / r

    def shape(self) -> tuple[int, ...] | None:
        """The natural (out, in, *kernel) shape of ΔW, from tensor shapes only (no maths). None: bias only."""
        t = self.t
        if self.kind == "lora":
            down, up = t["down"].shape, t["up"].shape
            if "mid" in t:
                return (up[0], down[1], *t["mid"].shape[2:])
            return (up[0], *down[1:])
        if self.kind == "loha":
            if "t1" in t:
                return (t["w1a"].shape[1], t["w1b"].shape[1], *t["t1"].shape[2:])
            return (t["w1a"].shape[0], *t["w1b"].shape[1:])
        if self.kind == "lokr":
            s1 = tuple(t["k1"].shape) if "k1" in t else (t["k1a"].shape[0], t["k1b"].shape[1])
            if "k2" in t:
                s2 = tuple(t["k2"].shape)
            elif "kt2" in t:
                s2 = (t["k2a"].shape[1], t["k2b"].shape[1], *t["kt2"].shape[2:])
            else:
                s2 = (t["k2a"].shape[0], t["k2b"].shape[1])
            return (s1[0] * s2[0], s1[1] * s2[1], *s2[2:])
        return tuple(t["diff"].shape) if "diff" in t else None

    def fits(self, weight_shape: tuple[int, ...]) -> bool:
        """ΔW can be laid onto a weight of this shape (same out width and size: 1x1 conv <-> linear is fine)."""
        s = self.shape()
        if s is None:
            return "diff_b" in self.t
        return s[0] == weight_shape[0] and math.prod(s) == math.prod(weight_shape)

    def _raw(self, device) -> torch.Tensor:
        f = {k: v.to(device=device, dtype=torch.float32) for k, v in self.t.items() if k not in ("alpha",)}
        if self.kind == "lora":
            up, down = f["up"].flatten(1), f["down"].flatten(1)
            if "mid" in f:  # LoCon Tucker: up @ mid @ down at every kernel position
                return torch.einsum("n m k l, i n, m j -> i j k l", f["mid"], up, down)
            return up @ down
        if self.kind == "loha":
            d1 = _cp(f["t1"], f["w1a"], f["w1b"]) if "t1" in f else f["w1a"] @ f["w1b"].flatten(1)
            d2 = _cp(f["t2"], f["w2a"], f["w2b"]) if "t2" in f else f["w2a"] @ f["w2b"].flatten(1)
            return d1 * d2
        if self.kind == "lokr":
            w1 = f["k1"] if "k1" in f else f["k1a"] @ f["k1b"]
            if "k2" in f:
                w2 = f["k2"]
            elif "kt2" in f:
                w2 = _cp(f["kt2"], f["k2a"], f["k2b"])
            else:
                w2 = f["k2a"] @ f["k2b"]
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            return torch.kron(w1, w2)
        return f["diff"]

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor | None:
        """ΔW (float32, alpha-scaled, DoRA applied) shaped like ``weight``; None for a bias-only layer."""
        if self.shape() is None:
            return None
        w = weight.detach().float()
        delta = self._raw(w.device).reshape(w.shape) * self.scale()
        ds = self.dora_scale
        if ds is None:
            return delta
        return _dora(w, delta, ds.to(device=w.device, dtype=torch.float32))

    def bias_delta(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        db = self.t.get("diff_b")
        if db is None or bias is None or db.numel() != bias.numel():
            return None
        return db.to(device=bias.device, dtype=torch.float32).reshape(bias.shape)


def _dora(w: torch.Tensor, delta: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
    """Weight-decomposed delta. The magnitude vector sits on the output axis ([out] / [out, 1, ...], peft and
    LyCORIS wd_on_out) or the input axis ([1, in, ...], kohya's default): the norm is taken across the other."""
    merged = w + delta
    if ds.shape[0] == w.shape[0] and ds.numel() == w.shape[0]:
        norm = merged.flatten(1).norm(dim=1).reshape(w.shape[0], *[1] * (w.ndim - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.ndim - 2))
    return merged * (ds.reshape(norm.shape) / norm.clamp_min(1e-12)) - w


@dataclass
class RowSliceDelta:
    """Rows [start, end) of a delta made for a fused layer (FLUX's ``img_attn.qkv``, ``linear1``) whose parts
    are separate modules in diffusers. A LoRA slices its up matrix (exact, no full product); other kinds
    compute the fused delta and slice it. DoRA needs the fused weight's norms, so it is refused earlier."""

    delta: LayerDelta
    start: int
    end: int

    @property
    def t(self) -> dict:
        return {}                                 # no bias deltas on a fused layer's parts

    def shape(self) -> tuple[int, ...] | None:
        s = self.delta.shape()
        return None if s is None else (self.end - self.start, *s[1:])

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor | None:
        d = self.delta
        w = weight.detach().float()
        if d.kind == "lora" and "mid" not in d.t:
            up = d.t["up"].to(device=w.device, dtype=torch.float32).flatten(1)[self.start:self.end]
            down = d.t["down"].to(device=w.device, dtype=torch.float32).flatten(1)
            return (up @ down).reshape(w.shape) * d.scale()
        full = d._raw(w.device).reshape(d.shape()[0], -1)[self.start:self.end]
        return full.reshape(w.shape) * d.scale()

    def bias_delta(self, bias: torch.Tensor | None) -> None:
        return None
