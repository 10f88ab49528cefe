"""LoRA operations: bake into a checkpoint, merge several into one, resize by SVD, extract from two checkpoints.

LoRA / LyCORIS files are parsed by studio.adapters (``load_lora_file``): every layer, whatever its algorithm
(LoRA, LoCon, LoHa, LoKr, full diff, DoRA), yields its ΔW through ``LayerDelta.weight_delta``. The operations
here work on those ΔW, so LyCORIS inputs are converted for free. Outputs are kohya-format ``.safetensors``
with kohya / modelspec metadata, written atomically into models/Lora (checkpoints into models/Stable-diffusion).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import families
from ..errors import StudioError
from .checkpoints import MergeReport, Progress, _out_dtype
from .lora_keys import LayerTarget, checkpoint_layers, kohya_te_prefix, last_openclip_block, layer_index
from .lowrank import Factors, exact_factors, lora_metadata, svd_factors, write_lora
from .sources import family_label, family_of, open_checkpoint, output_path
from .stio import TensorInfo, write_streaming

LORA_EXTS = (".safetensors", ".pt", ".ckpt")


@dataclass
class LayerStat:
    old_rank: int | None
    new_rank: int
    energy: float            # kept share of ΔW's squared Frobenius norm


@dataclass
class LoraResult:
    path: Path
    layers: dict[str, LayerStat] = field(default_factory=dict)
    energy: float = 1.0      # over all layers: Σ kept / Σ total squared norm
    notes: list[str] = field(default_factory=list)


# ---- inputs ------------------------------------------------------------------------------------------------------
def find_lora(settings, name: str, field_name: str = "loras") -> Path:
    """A LoRA by file stem, file name or path relative to models/Lora (or models/LyCORIS)."""
    clean = name.strip().replace("\\", "/")
    if not clean or clean.startswith(("/", "~")) or ".." in clean.split("/"):
        raise StudioError(f"LoRA {name!r} is not a name inside the LoRA folder.", field=field_name,
                          fix="use the LoRA's name as listed")
    seen = []
    for root in (Path(settings.lora_path), Path(settings.lycoris_path)):
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() not in LORA_EXTS or p.name.startswith("."):
                continue
            rel = p.relative_to(root).as_posix()
            seen.append(p.stem)
            if clean in (p.stem, p.name, rel, rel[: -len(p.suffix)]):
                return p
    raise StudioError(f"LoRA {name!r} was not found in {settings.lora_path}.", field=field_name, status=404,
                      fix=f"choose one of: {', '.join(seen[:30]) or 'none: the folder is empty'}")


def _load(settings, name: str):
    from ..adapters.lora_files import load_lora_file
    return load_lora_file(find_lora(settings, name))


def _entry(item) -> tuple[str, float, float]:
    """(name, te weight, unet weight) from ("name", w), ("name", te, unet), or "name:w[:unet]"."""
    if isinstance(item, str):
        parts = item.split(":")
        item = (parts[0], *[float(p) for p in parts[1:]]) if len(parts) > 1 else (parts[0], 1.0)
    name, *w = item
    w = [float(x) for x in w] or [1.0]
    return name, w[0], (w[1] if len(w) > 1 else w[0])


def _natural_delta(delta, what: str) -> torch.Tensor | None:
    """ΔW of a parsed layer without a base weight (impossible for DoRA, which normalises W + ΔW)."""
    if delta.dora_scale is not None:
        raise StudioError(f"{what} is a DoRA layer: its effect depends on the base weights, so it cannot be "
                          "merged or resized on its own.", field="loras", fix="bake it into a checkpoint instead")
    shape = delta.shape()
    return None if shape is None else delta.weight_delta(torch.zeros(shape))


def _stem(comp: str, layer: str, family: str | None) -> str:
    if comp == "unet":
        return "lora_unet_" + layer
    return kohya_te_prefix(family, comp) + "text_model_" + layer


def _family(files) -> str | None:
    fams = {lf.family for lf in files if lf.family}
    if len(fams) > 1:
        raise StudioError("These LoRAs are for different model families (" +
                          ", ".join(f"{lf.name}: {family_label(lf.family)}" for lf in files) + ").",
                          field="loras", fix="merge LoRAs made for one family")
    if fams:
        return fams.pop()
    made_for = families.from_lora({comp for lf in files for comp, _ in lf.layers if comp != "unet"})
    return made_for.name if made_for else None


def _is_conv(shape) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def _finish(path, layers: dict[str, Factors], family, title, extra, fp16, notes=()) -> LoraResult:
    if not layers:
        raise StudioError("Nothing to write: no layer has a non-zero difference.", field="loras")
    write_lora(path, layers, lora_metadata(family, layers, title, extra), torch.float16 if fp16 else torch.float32)
    total = kept = 0.0
    stats = {}
    for stem, f in layers.items():
        norm = float(f.delta().float().pow(2).sum()) / max(f.energy, 1e-12)
        total, kept = total + norm, kept + norm * f.energy
        stats[stem] = LayerStat(f.old_rank, f.rank, f.energy)
    return LoraResult(Path(path), stats, kept / total if total else 1.0, list(notes))


# ---- (a) bake ----------------------------------------------------------------------------------------------------
def bake_loras(registry, settings, checkpoint: str, loras: list, output_name: str, *, fp16: bool = False,
               save_metadata: bool = True, overwrite: bool = False, progress: Progress | None = None,
               report: MergeReport | None = None) -> Path:
    """New checkpoint = checkpoint with W + Σ weight × ΔW for each LoRA, streamed tensor by tensor.

    ``loras``: [("name", weight)] or [("name", te_weight, unet_weight)] (A1111's <lora:name:te:unet>)."""
    report = report if report is not None else MergeReport()
    if not loras:
        raise StudioError("Choose at least one LoRA to bake.", field="loras")
    info = registry.find_checkpoint(checkpoint, "checkpoint")
    dest = output_path(settings.ckpt_path, output_name, ext=".safetensors", overwrite=overwrite)
    entries = [_entry(x) for x in loras]
    files = [_load(settings, name) for name, _, _ in entries]
    with open_checkpoint(info) as src:
        family = family_of(src, info.name)
        shapes = {k: v.shape for k, v in src.infos.items()}
        index = layer_index(checkpoint_layers(shapes, family))
        patches: dict[str, list] = {}
        for lf, (name, te, un) in zip(files, entries):
            if lf.family and lf.family != family:
                raise StudioError(f"LoRA {name!r} is for {family_label(lf.family)}; {info.name!r} is "
                                  f"{family_label(family)}.", field="loras", fix="pick a LoRA made for this model")
            missing = 0
            for (comp, layer), delta in lf.layers.items():
                lt = index.get((comp, layer))
                if lt is None or (delta.shape() is not None and not delta.fits(lt.shape)):
                    missing += 1
                    continue
                w = un if comp == "unet" else te
                if delta.shape() is not None:
                    patches.setdefault(lt.key, []).append((lt, delta, w, False))
                if "diff_b" in delta.t and lt.bias:
                    patches.setdefault(lt.bias, []).append((lt, delta, w, True))
            if missing:
                report.notes.append(f"{missing} layers of {name!r} have no matching weight in the checkpoint")
        plan = {k: TensorInfo(_out_dtype(v.dtype, fp16), v.shape) for k, v in src.infos.items()}
        meta = {"format": "pt"}
        if save_metadata:
            from ..hashes import addnet_hash
            meta["sd_merge_recipe"] = json.dumps({
                "type": "studio-lora-bake", "checkpoint": info.name, "checkpoint_hash": registry.ensure_hash(info),
                "loras": [{"name": n, "hash": addnet_hash(lf.path), "te": te, "unet": un}
                          for lf, (n, te, un) in zip(files, entries)], "save_as_half": fp16})
        done = [0]

        def produce(key):
            t = src.get(key)
            if key in patches:
                t = _patched(t, patches[key])
            done[0] += 1
            if progress:
                progress(done[0], len(plan), key)
            return t.to(plan[key].dtype)

        write_streaming(dest, plan, produce, meta)
    registry.refresh()
    return dest


def _patched(t: torch.Tensor, items) -> torch.Tensor:
    w = t.float()
    orig = w.clone()  # every ΔW is taken against the original weight (DoRA needs it), as the live patcher does
    for lt, delta, weight, is_bias in items:
        rows = slice(*lt.rows) if lt.rows else slice(None)
        if is_bias:
            d = delta.bias_delta(orig[rows])
        else:
            part = orig[rows].reshape(lt.shape)
            d = delta.weight_delta(part)
        if d is not None:
            w[rows] += weight * d.reshape(w[rows].shape)
    return w


# ---- (b) merge ---------------------------------------------------------------------------------------------------
def merge_loras(settings, loras: list, output_name: str, *, mode: str = "concat", rank: int | None = None,
                conv_rank: int | None = None, clamp_quantile: float | None = None, fp16: bool = True,
                overwrite: bool = False, progress: Progress | None = None) -> LoraResult:
    """Several LoRAs (with weights) -> one. ``concat`` is exact: the ranks are stacked, each input's weight and
    alpha/rank folded into its down matrix (LyCORIS layers join as exact SVD factors). ``svd``: Σ weight × ΔW
    factored to ``rank`` (``conv_rank`` for 3x3 convs)."""
    if mode not in ("concat", "svd"):
        raise StudioError(f"Unknown LoRA merge mode {mode!r}.", field="mode", fix="use concat or svd")
    if mode == "svd" and not rank:
        raise StudioError("SVD merge needs a target rank.", field="rank", fix="set the rank (e.g. 32)")
    entries = [_entry(x) for x in loras]
    if not entries:
        raise StudioError("Choose LoRAs to merge.", field="loras")
    dest = output_path(settings.lora_path, output_name, ext=".safetensors", overwrite=overwrite)
    files = [_load(settings, n) for n, _, _ in entries]
    family = _family(files)
    keys = list(dict.fromkeys(k for lf in files for k in lf.layers))
    out: dict[str, Factors] = {}
    for i, key in enumerate(keys):
        parts = [(lf, lf.layers[key], un if key[0] == "unet" else te)
                 for lf, (_, te, un) in zip(files, entries) if key in lf.layers]
        f = _concat(parts, key) if mode == "concat" else _svd_sum(parts, key, rank, conv_rank, clamp_quantile)
        if f is not None:
            out[_stem(*key, family)] = f
        if progress:
            progress(i + 1, len(keys), "_".join(key))
    extra = {"ss_merged_from": json.dumps([{"name": n, "te": te, "unet": un} for n, te, un in entries]),
             "ss_merge_mode": mode}
    return _finish(dest, out, family, Path(dest).stem, extra, fp16)


def _concat(parts, key) -> Factors | None:
    downs, ups = [], []
    shape = None
    for lf, d, w in parts:
        if d.kind == "lora" and "mid" not in d.t and d.dora_scale is None:
            down, up, scale = d.t["down"].float(), d.t["up"].float(), d.scale()
        else:
            delta = _natural_delta(d, f"{lf.name}: {'_'.join(key)}")
            if delta is None:
                continue
            f = exact_factors(delta)
            down, up, scale = f.down, f.up, 1.0
        shape = shape or (up.shape[0], *down.shape[1:])
        downs.append((down * (w * scale)).reshape(down.shape[0], *shape[1:]))
        ups.append(up.flatten(1))
    if not downs:
        return None
    down = torch.cat(downs)
    up = torch.cat(ups, dim=1).reshape(shape[0], down.shape[0], *([1] * (len(shape) - 2)))
    return Factors(down.contiguous(), up.contiguous(), alpha=float(down.shape[0]), old_rank=down.shape[0])


def _svd_sum(parts, key, rank, conv_rank, clamp) -> Factors | None:
    total = None
    for lf, d, w in parts:
        delta = _natural_delta(d, f"{lf.name}: {'_'.join(key)}")
        if delta is not None:
            total = w * delta if total is None else total + (w * delta).reshape(total.shape)
    if total is None or not total.any():
        return None
    r = conv_rank if _is_conv(total.shape) and conv_rank else rank
    f = svd_factors(total, rank=r, clamp=clamp)
    f.old_rank = sum(d.rank or 0 for _, d, _ in parts) or None
    return f


# ---- (c) resize --------------------------------------------------------------------------------------------------
def resize_lora(settings, name: str, output_name: str, *, rank: int | None = None, conv_rank: int | None = None,
                method: str = "fixed", param: float | None = None, fp16: bool = True, overwrite: bool = False,
                progress: Progress | None = None) -> LoraResult:
    """Lower a LoRA's rank by SVD: ``fixed`` to ``rank`` (``conv_rank`` for 3x3 convs), or dynamically per layer
    (``sv_ratio`` / ``sv_fro`` / ``sv_cumulative`` with ``param``, ``rank`` then being the cap). The alpha/rank
    ratio of each layer is kept. Reports the kept energy per layer and overall."""
    from .lowrank import RANK_METHODS
    if method not in RANK_METHODS:
        raise StudioError(f"Unknown resize method {method!r}.", field="method", fix=f"use one of {', '.join(RANK_METHODS)}")
    if method == "fixed" and not rank:
        raise StudioError("Resizing to a fixed rank needs the rank.", field="rank", fix="set the new rank")
    if method != "fixed" and param is None:
        raise StudioError(f"{method} needs its parameter (ratio or share).", field="param")
    lf = _load(settings, name)
    dest = output_path(settings.lora_path, output_name, ext=".safetensors", overwrite=overwrite)
    family = _family([lf])
    out: dict[str, Factors] = {}
    for i, (key, d) in enumerate(lf.layers.items()):
        delta = _natural_delta(d, f"{lf.name}: {'_'.join(key)}")
        if delta is not None and delta.any():
            r = conv_rank if _is_conv(delta.shape) and conv_rank else rank
            old = d.rank or min(delta.shape[0], math.prod(delta.shape[1:]))
            scale = d.scale() if d.kind == "lora" else 1.0
            f = svd_factors(delta, rank=min(r or old, old), method=method, param=param, scale=scale)
            f.old_rank = d.rank
            out[_stem(*key, family)] = f
        if progress:
            progress(i + 1, len(lf.layers), "_".join(key))
    extra = {k: v for k, v in lf.metadata.items() if k.startswith("ss_") and k not in
             ("ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_network_module")}
    extra["ss_resized_from"] = lf.name
    return _finish(dest, out, family, Path(dest).stem, extra, fp16)


# ---- (d) extract -------------------------------------------------------------------------------------------------
def extract_lora(registry, settings, tuned: str, base: str, output_name: str, *, rank: int = 32,
                 conv_rank: int = 0, clamp_quantile: float | None = 0.99, min_diff: float = 0.01,
                 fp16: bool = True, overwrite: bool = False, progress: Progress | None = None) -> LoraResult:
    """LoRA approximating (tuned − base) by SVD per layer, like kohya's extract_lora_from_models: the usual
    targets at ``rank``, 3x3 convs at ``conv_rank`` (0: none), factors clamped at the ``clamp_quantile``. The
    text encoder is kept only if some layer of it differs by more than ``min_diff``."""
    ti, bi = registry.find_checkpoint(tuned, "tuned"), registry.find_checkpoint(base, "base")
    dest = output_path(settings.lora_path, output_name, ext=".safetensors", overwrite=overwrite)
    with open_checkpoint(ti) as ts, open_checkpoint(bi) as bs:
        family, fb = family_of(ts, ti.name), family_of(bs, bi.name)
        if family != fb:
            raise StudioError(f"Tuned model {ti.name!r} is {family_label(family)} but base {bi.name!r} is "
                              f"{family_label(fb)}.", field="base", fix=f"pick the {family_label(family)} base model")
        shapes = {k: v.shape for k, v in ts.infos.items()}
        skip = last_openclip_block(shapes, family)
        targets = [lt for lt in checkpoint_layers(shapes, family) if lt.is_default_target(conv_rank > 0)
                   and bs.infos.get(lt.key) is not None and bs.infos[lt.key].shape == ts.infos[lt.key].shape
                   and not (skip and lt.comp != "unet" and lt.name.startswith(skip))]
        out: dict[str, tuple[LayerTarget, Factors, float]] = {}
        cache: dict[str, torch.Tensor] = {}
        for i, lt in enumerate(targets):
            if lt.key not in cache:  # fused q/k/v share one tensor: read it once
                cache = {lt.key: ts.get(lt.key).float() - bs.get(lt.key).float()}
            diff = cache[lt.key][slice(*lt.rows)] if lt.rows else cache[lt.key]
            peak = float(diff.abs().max()) if diff.numel() else 0.0
            if peak > 0:
                r = conv_rank if _is_conv(diff.shape) else rank
                out[lt.kohya(family)] = (lt, svd_factors(diff, rank=r, clamp=clamp_quantile), peak)
            if progress:
                progress(i + 1, len(targets), lt.key)
    notes = []
    te_peak = max((p for lt, _, p in out.values() if lt.comp != "unet"), default=0.0)
    if te_peak <= min_diff:
        if te_peak > 0:
            notes.append(f"text encoders differ by at most {te_peak:.3g} ≤ {min_diff}: left out")
        out = {k: v for k, v in out.items() if v[0].comp == "unet"}
    extra = {"ss_sd_model_name": bi.name, "ss_extracted_from": ti.name}
    return _finish(dest, {k: f for k, (_, f, _) in out.items()}, family, Path(dest).stem, extra, fp16, notes)
