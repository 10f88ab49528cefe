"""Low-rank factors of weight deltas (SVD), rank choice, quantile clamp, and kohya-format LoRA writing."""
from __future__ import annotations

import datetime
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import families
from .stio import TensorInfo, _tensor_bytes, write_streaming

RANK_METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class Factors:
    """One kohya LoRA layer: ΔW = up @ down × alpha / rank (conv: down [r, in, kh, kw], up [out, r, 1, 1])."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    energy: float = 1.0          # fraction of ΔW's squared Frobenius norm the factors keep
    old_rank: int | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """ΔW in the layer's natural shape (float32)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down).reshape(self.up.shape[0], *self.down.shape[1:]) * (self.alpha / self.rank)


def choose_rank(s: torch.Tensor, method: str, param: float | None, max_rank: int | None) -> int:
    """How many singular values to keep. ``fixed``: ``max_rank``; ``sv_ratio``: those ≥ s_max / param;
    ``sv_fro``: the fewest whose Frobenius share (sqrt of summed s²) reaches param; ``sv_cumulative``: the
    fewest whose share of Σs reaches param. Always at least 1, at most ``max_rank`` and len(s)."""
    n = len(s)
    if method == "fixed" or param is None:
        r = max_rank or n
    elif method == "sv_ratio":
        r = int((s >= s[0] / param).sum()) if s[0] > 0 else 1
    elif method == "sv_fro":
        share = torch.sqrt(torch.cumsum(s ** 2, 0) / (s ** 2).sum().clamp_min(1e-30))
        r = int((share < param - 1e-7).sum()) + 1
    elif method == "sv_cumulative":
        share = torch.cumsum(s, 0) / s.sum().clamp_min(1e-30)
        r = int((share < param - 1e-7).sum()) + 1
    else:
        raise ValueError(f"unknown rank method {method!r}")
    return max(1, min(r, n, max_rank or n))


def quantile_clamp(*tensors: torch.Tensor, q: float) -> list[torch.Tensor]:
    """kohya's clamp: the q-quantile of all factor entries (signed) bounds every entry to ±that value.
    kthvalue instead of torch.quantile, which refuses inputs of more than 2**24 elements."""
    flat = torch.cat([t.flatten() for t in tensors])
    k = min(len(flat), max(1, math.ceil(q * len(flat))))
    hi = float(flat.kthvalue(k).values)
    return [t.clamp(-hi, hi) for t in tensors]


def svd_factors(delta: torch.Tensor, *, rank: int | None, method: str = "fixed", param: float | None = None,
                clamp: float | None = None, scale: float = 1.0) -> Factors:
    """Factor ``delta`` (natural shape) as up @ down with the singular values in ``up`` (kohya's choice).

    ``scale`` is the alpha/rank ratio to keep: the factors represent delta / scale and alpha = scale × rank,
    so resizing a LoRA does not change its alpha/rank convention."""
    shape = tuple(delta.shape)
    mat = delta.float().reshape(shape[0], -1) / scale
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = choose_rank(s, method, param, rank)
    total = float((s ** 2).sum())
    energy = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
    up, down = u[:, :r] * s[:r], vh[:r]
    if clamp is not None and 0 < clamp < 1:
        up, down = quantile_clamp(up, down, q=clamp)
    up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
    down = down.reshape(r, *shape[1:])
    return Factors(down.contiguous(), up.contiguous(), alpha=scale * r, energy=energy)


def exact_factors(delta: torch.Tensor, tol: float = 1e-6) -> Factors:
    """Factors that reproduce ``delta`` (numerical rank only): how a LyCORIS / full-diff layer joins a concat."""
    mat = delta.float().reshape(delta.shape[0], -1)
    s = torch.linalg.svdvals(mat)
    r = int((s > s[0] * tol).sum()) if len(s) and s[0] > 0 else 1
    return svd_factors(delta, rank=max(r, 1))


def lora_metadata(family: str | None, layers: dict[str, Factors], title: str, extra: dict | None = None) -> dict:
    """kohya / A1111 metadata for a written LoRA (dims are the largest linear and conv ranks)."""
    linear = [f.rank for f in layers.values() if f.down.ndim == 2 or f.down.shape[2:] == (1, 1)]
    conv = [f for f in layers.values() if f.down.ndim == 4 and f.down.shape[2:] != (1, 1)]
    dim = max(linear, default=max((f.rank for f in conv), default=0))
    alpha = next((f.alpha for f in layers.values() if f.rank == dim), dim)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.title": title,
            "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat()}
    if conv:
        cdim = max(f.rank for f in conv)
        meta["ss_network_args"] = json.dumps({"conv_dim": str(cdim),
                                              "conv_alpha": str(next(f.alpha for f in conv if f.rank == cdim))})
    fam = families.get(family)
    if fam:
        meta["ss_base_model_version"] = fam.kohya_version
        meta["ss_v2"] = str(fam.kohya_v2)
        meta["modelspec.architecture"] = fam.modelspec_arch + "/lora"
    meta.update(extra or {})
    return meta


def write_lora(path: Path, layers: dict[str, Factors], metadata: dict, dtype: torch.dtype) -> None:
    """Write kohya tensors (``<stem>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``) atomically.

    ``sshs_model_hash`` (the addnet hash A1111 shows) is the sha256 of the tensor bytes, which do not depend on
    the header, so it is computed before writing and stored in the same pass."""
    tensors: dict[str, torch.Tensor] = {}
    for stem in sorted(layers):
        f = layers[stem]
        tensors[f"{stem}.alpha"] = torch.tensor(float(f.alpha), dtype=dtype)
        tensors[f"{stem}.lora_down.weight"] = f.down.to(dtype).contiguous()
        tensors[f"{stem}.lora_up.weight"] = f.up.to(dtype).contiguous()
    h = hashlib.sha256()
    for t in tensors.values():
        h.update(_tensor_bytes(t))
    meta = {**metadata, "sshs_model_hash": h.hexdigest()}
    plan = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_streaming(path, plan, tensors.__getitem__, meta)
