"""Read a LoRA / LyCORIS / diffusers-LoRA file once into per-layer deltas (``LoraFile``).

The result does not depend on the loaded checkpoint: layers are named model-independently (see keys.py) and
resolved against a model only when patched, so one parsed file serves every checkpoint it fits.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..lazy import torch
from ..loading.state_dict import read_header, read_state_dict
from .deltas import LayerDelta, kind_of
from .keys import family_hint, split_key

LORA_EXTS = (".safetensors", ".pt", ".ckpt")


@dataclass
class LoraFile:
    """A parsed adapter file. ``layers`` maps (component, layer name) -> LayerDelta; components are "unet",
    "te1" (text_encoder) and "te2" (text_encoder_2)."""

    name: str                                   # file stem: the name in <lora:name:...>
    path: Path
    kind: str                                   # lora | locon | loha | lokr | full | diffusers | mixed
    metadata: dict[str, str]
    family: str | None                          # a family name (studio.families) or None when nothing says
    layers: dict[tuple[str, str], LayerDelta]
    unknown_keys: list[str] = field(default_factory=list)
    ident: str = ""                             # path + mtime + size: identity of this version of the file

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())

    @property
    def has_dora(self) -> bool:
        return any(layer.dora_scale is not None for layer in self.layers.values())


def file_ident(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}"


def header_info(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple]]:
    """(metadata, tensor shapes) of a .safetensors file from its header only; ({}, {}) for pickles."""
    if not str(path).lower().endswith(".safetensors"):
        return {}, {}
    header, meta = read_header(os.fspath(path))
    return ({str(k): str(v) for k, v in meta.items()}, {k: tuple(v.get("shape", ())) for k, v in header.items()})


def parse_state_dict(sd: dict[str, torch.Tensor], *, name: str, path: Path, metadata: dict[str, str],
                     ident: str = "") -> LoraFile:
    """Group tensors into layers, name their algorithm, and collect what is not understood."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    keys_of: dict[tuple[str, str], list[str]] = {}
    unknown: list[str] = []
    dotted = 0
    for key, tensor in sd.items():
        parsed = split_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        comp, layer, role, is_dotted = parsed
        dotted += is_dotted
        groups.setdefault((comp, layer), {})[role] = tensor
        keys_of.setdefault((comp, layer), []).append(key)
    layers: dict[tuple[str, str], LayerDelta] = {}
    alphas = _peft_alphas(metadata)
    for lid, t in groups.items():
        kind = kind_of(set(t))
        if kind is None:
            unknown.extend(keys_of[lid])  # e.g. a lora_down without its lora_up
            continue
        alpha = t.pop("alpha", None)
        alpha_v = float(alpha.float().reshape(-1)[0]) if isinstance(alpha, torch.Tensor) and alpha.numel() else None
        if alpha_v is None and kind == "lora" and alphas is not None:
            alpha_v = alphas
        layers[lid] = LayerDelta(kind, {k: v.contiguous() for k, v in t.items()}, alpha_v)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return LoraFile(name=name, path=path, kind=_file_kind(layers, dotted, metadata), metadata=metadata,
                    family=family_hint(metadata, shapes), layers=layers, unknown_keys=sorted(unknown),
                    ident=ident)


def _peft_alphas(meta: dict) -> float | None:
    """lora_alpha from an embedded peft adapter config (diffusers writes it as JSON metadata); None if absent."""
    for key in ("lora_adapter_metadata", "unet.lora_adapter_metadata", "adapter_config"):
        raw = meta.get(key)
        if not raw:
            continue
        try:
            cfg = json.loads(raw)
        except ValueError:
            continue
        if isinstance(cfg, dict) and cfg.get("lora_alpha"):
            return float(cfg["lora_alpha"])
    return None


def _file_kind(layers: dict, dotted: int, meta: dict) -> str:
    kinds = {layer.kind for layer in layers.values()}
    for k in ("loha", "lokr", "full"):
        if kinds == {k}:
            return k
    if len(kinds) > 1:
        return "mixed"
    if dotted:
        return "diffusers"
    conv = any(layer.kind == "lora" and ("mid" in layer.t or (layer.t["down"].ndim == 4 and
                                                            layer.t["down"].shape[-1] > 1))
               for layer in layers.values())
    return "locon" if conv or "locon" in str(meta.get("ss_network_module", "")).lower() else "lora"


def load_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read and parse one file (safetensors, or a pickle loaded with weights_only=True)."""
    path = Path(path)
    ident = file_ident(path)
    metadata, _ = header_info(path)
    sd = read_state_dict(os.fspath(path))
    return parse_state_dict(sd, name=path.stem, path=path, metadata=metadata, ident=ident)
