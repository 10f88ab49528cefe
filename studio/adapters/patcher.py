"""Patch LoRA deltas into the live weights of one checkpoint and restore them bit-exactly.

Weight patching (not forward hooks) keeps the per-step time equal to the time without LoRAs (memory.md). Before
a layer is first touched its original tensor is copied to the CPU (RAM: the cheapest tier); ``restore`` copies
those back and drops them, so the model is bit-exactly as loaded however many sets were applied and nothing is
held while no LoRA is active. The patched state is keyed on the sorted (file identity, te weight, unet weight)
list: applying an unchanged set costs nothing. Originals and cached sets are RAM beside the model: ``nbytes``
reports them and the PipelineManager counts them in its RAM tier.

Why keep originals instead of subtracting the delta again: ``round(round(w + d) - d) == w`` fails for 8-13 % of
the elements of every tensor tried (fp32, fp16, bf16; a rank-32 delta), and restoring from the delta needs it at
restore time, i.e. recomputing the LoRA (seconds at real size) or keeping it in fp32 (more bytes than the
original in the model's dtype).
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .. import families, quantize
from ..lazy import torch
from ..offload import live_tensor
from .deltas import LayerDelta, RowSliceDelta
from .keys import FusedLayer, module_index
from .lora_files import LoraFile

# a LoRA whose layers fit this model less than this is taken for another model and skipped whole
MIN_FIT = 0.5
# patched-set cache of a patcher made without settings (scripts, tests); the studio's comes from the settings
DEFAULT_CACHE_BYTES = 512 << 20
_TE_LAYER = re.compile(r"^encoder_layers_(\d+)_")


def _label(family: str | None) -> str:
    return families.short_label(family) if family else "unknown"


@dataclass
class _Target:
    module: Any
    entries: list[tuple[LayerDelta, float]] = field(default_factory=list)


@dataclass
class _PatchedSet:
    """A computed patch kept for quick re-activation: the patched tensors (CPU) and what apply reported."""

    tensors: dict[tuple[int, str], tuple[Any, str, torch.Tensor]]
    warnings: list[str]
    applied: list[tuple[str, float, float]]
    te_key: tuple
    nbytes: int


class AdapterPatcher:
    """LoRA patch state of one ``Components``. Thread-safe; ``apply`` / ``restore`` may be called per job.

    Originals of touched tensors are kept (CPU) while they are patched; the last patched sets are kept too (CPU,
    in the model's dtype, under ``cache_bytes``; 0: none) so switching back to a recent set is a copy, not a
    recompute. Call ``release()`` before the weights are changed by anything else (merge, training, unloading).
    """

    def __init__(self, components, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.components = components
        self.cache_bytes = cache_bytes
        self._lock = threading.RLock()
        self._index: dict[str, dict[str, Any]] | None = None
        self._originals: dict[tuple[int, str], tuple[Any, str, torch.Tensor]] = {}
        self._originals_bytes = 0    # running totals: the manager reads them from other threads, lock-free
        self._cached_bytes = 0
        self._dirty: set[tuple[int, str]] = set()
        self._sets: OrderedDict[tuple, _PatchedSet] = OrderedDict()
        self._key: tuple = ()
        self._warnings: list[str] = []
        self.applied: list[tuple[str, float, float]] = []   # (name, te, unet) of LoRAs actually patched in
        self._te_key: tuple = ()
        self.patch_count = 0                                  # sets computed (not counting cache hits)

    # ---- state ---------------------------------------------------------------------------------------------
    @property
    def key(self) -> tuple:
        """The currently patched set: sorted (file identity, te weight, unet weight); () when unpatched."""
        return self._key

    @property
    def te_key(self) -> tuple:
        """The part of ``key`` that changes text-encoder weights: the prompt encoder's cache key component."""
        return self._te_key

    @property
    def patched_params(self) -> int:
        return len(self._dirty)

    @property
    def originals_bytes(self) -> int:
        """RAM held by copies of the original tensors (0 while no LoRA is patched in)."""
        return self._originals_bytes

    @property
    def cached_bytes(self) -> int:
        """RAM held by the patched-set cache."""
        return self._cached_bytes

    @property
    def nbytes(self) -> int:
        """All RAM this patcher holds beside the model (the manager counts it in its RAM tier)."""
        return self._originals_bytes + self._cached_bytes

    def index(self) -> dict[str, dict[str, Any]]:
        if self._index is None:
            self._index = module_index(self.components)
        return self._index

    @staticmethod
    def set_key(active) -> tuple:
        return tuple(sorted((lf.ident or str(lf.path), float(te), float(un)) for lf, te, un in active
                            if te != 0 or un != 0))

    # ---- public --------------------------------------------------------------------------------------------
    def apply(self, active: list[tuple[LoraFile, float, float]]) -> list[str]:
        """Make the weights equal original + Σ weight × ΔW for ``active`` [(file, te_weight, unet_weight)].

        Returns warnings (skipped files, missing layers, unknown keys). Weight 0 skips that part."""
        active = [(lf, float(te), float(un)) for lf, te, un in active if te != 0 or un != 0]
        key = self.set_key(active)
        with self._lock, torch.no_grad():
            self._trim()  # the cache setting may have been lowered since the last job
            if key == self._key:
                return list(self._warnings)
            self._restore_weights()
            if not key:
                self._drop_originals()
                return []
            cached = self._sets.get(key)
            if cached is not None:
                self._sets.move_to_end(key)
                for okey, (module, attr, tensor) in cached.tensors.items():
                    self._save_original(okey, module, attr)
                    live_tensor(module, attr).data.copy_(tensor)
                    self._dirty.add(okey)
            else:
                cached = self._compute(active)
                self._remember(key, cached)
            self._drop_originals(keep=self._dirty)  # those of the previous set's layers this one leaves alone
            self._key, self._warnings, self.applied, self._te_key = \
                key, cached.warnings, cached.applied, cached.te_key
            return list(cached.warnings)

    def restore(self) -> None:
        """Put every touched tensor back exactly as loaded and drop the originals (no-op when nothing is patched)."""
        with self._lock:
            self._restore_weights()
            self._drop_originals()

    def release(self) -> None:
        """Restore, then drop the cached sets too (frees all the RAM this patcher holds)."""
        with self._lock:
            self.restore()
            self._sets.clear()
            self._cached_bytes = 0
            self._index = None

    def _restore_weights(self) -> None:
        """Copy the originals back (they stay kept: ``apply`` reuses those of layers the next set touches)."""
        with torch.no_grad():
            for okey in self._dirty:
                module, attr, orig = self._originals[okey]
                live_tensor(module, attr).data.copy_(orig)
        self._dirty.clear()
        self._key, self._warnings, self.applied, self._te_key = (), [], [], ()

    def _drop_originals(self, keep: set | frozenset = frozenset()) -> None:
        for okey in [k for k in self._originals if k not in keep]:
            self._originals_bytes -= _tensor_bytes(self._originals.pop(okey)[2])

    # ---- internals -----------------------------------------------------------------------------------------
    def _plan(self, lf: LoraFile, te: float, un: float, targets: dict, warnings: list[str]) -> bool:
        """Resolve a file's layers against this model; add them to ``targets`` unless it does not fit."""
        family = self.components.family
        if lf.family and lf.family != family:
            warnings.append(f"LoRA '{lf.name}' is for {_label(lf.family)}; the loaded checkpoint is "
                            f"{_label(family)} – skipped.")
            return False
        index = self.index()
        found, missing, mismatched, unused = [], 0, 0, 0
        for (comp, layer), delta in lf.layers.items():
            module = index.get(comp, {}).get(layer)
            if module is None and self._unused_te_layer(comp, layer):
                unused += 1
            elif module is None:
                missing += 1
            elif not delta.fits(tuple(module.weight.shape)):
                mismatched += 1
            else:
                found.append((comp, module, delta))
        total = len(lf.layers) - unused
        if total == 0 or len(found) < MIN_FIT * total:
            hint = f" (made for {_label(lf.family)})" if lf.family else ""
            warnings.append(f"LoRA '{lf.name}'{hint} does not fit the loaded {_label(family)} checkpoint: only "
                            f"{len(found)} of {total} layers match – skipped.")
            return False
        if missing or mismatched:
            warnings.append(f"LoRA '{lf.name}': {missing} layers not in this model, {mismatched} with other "
                            f"shapes – those layers were skipped.")
        if lf.unknown_keys:
            warnings.append(f"LoRA '{lf.name}': {len(lf.unknown_keys)} keys not understood (e.g. "
                            f"{lf.unknown_keys[0]}) – ignored.")
        for comp, module, delta in found:
            w = un if comp == "unet" else te
            if w == 0:
                continue
            if isinstance(module, FusedLayer):   # one file layer, several modules here: each takes its rows
                if delta.dora_scale is not None:
                    warnings.append(f"LoRA '{lf.name}': DoRA on a fused layer cannot be split – that layer was "
                                    "skipped.")
                    continue
                for part, start, end in module.parts:
                    targets.setdefault((id(part), "weight"), _Target(part)).entries.append(
                        (RowSliceDelta(delta, start, end), w))
                continue
            if delta.shape() is not None:
                targets.setdefault((id(module), "weight"), _Target(module)).entries.append((delta, w))
            if "diff_b" in delta.t and getattr(module, "bias", None) is not None:
                targets.setdefault((id(module), "bias"), _Target(module)).entries.append((delta, w))
        return True

    def _unused_te_layer(self, comp: str, layer: str) -> bool:
        """SD2's diffusers text encoder lacks OpenCLIP's last block (SD2 conditions on the penultimate layer):
        LoRA layers for it have nothing to change and are not worth a warning."""
        m = _TE_LAYER.match(layer)
        spec = self.components.spec.encoder_by_lora_id(comp)
        te = getattr(self.components, spec.attr, None) if spec is not None else None
        return bool(m and te is not None and int(m.group(1)) >= te.config.num_hidden_layers)

    def _compute(self, active) -> _PatchedSet:
        warnings: list[str] = []
        targets: dict[tuple[int, str], _Target] = {}
        applied, te_key = [], []
        for lf, te, un in active:
            if self._plan(lf, te, un, targets, warnings):
                applied.append((lf.name, te, un))
                if te != 0 and any(comp != "unet" for comp, _ in lf.layers):
                    te_key.append((lf.ident or str(lf.path), te))
        size = sum(_tensor_bytes(getattr(t.module, okey[1])) for okey, t in targets.items())
        keep = size <= self.cache_bytes  # a set too big for the cache is recomputed when it comes back
        tensors = {}
        for okey, target in targets.items():
            patched = self._patch(target, okey, keep)
            if keep:
                tensors[okey] = (target.module, okey[1], patched)
        self.patch_count += 1
        return _PatchedSet(tensors, warnings, applied, tuple(sorted(te_key)), size if keep else 0)

    def _remember(self, key: tuple, patched: _PatchedSet) -> None:
        if not patched.tensors:
            return
        self._sets[key] = patched
        self._cached_bytes += patched.nbytes
        self._trim()

    def _trim(self) -> None:
        """Drop least-recently-used sets until the cache fits ``cache_bytes``."""
        while self._sets and self._cached_bytes > self.cache_bytes:
            self._cached_bytes -= self._sets.popitem(last=False)[1].nbytes

    def _save_original(self, okey, module, attr) -> None:
        if okey not in self._originals:
            orig = quantize.copy_of(live_tensor(module, attr))
            self._originals[okey] = (module, attr, orig)
            self._originals_bytes += _tensor_bytes(orig)

    def _patch(self, target: _Target, okey: tuple[int, str], keep: bool) -> torch.Tensor | None:
        """Write original + Σ weight × ΔW into one tensor; returns a CPU copy of the result if ``keep``."""
        attr = okey[1]
        param = live_tensor(target.module, attr)   # under --lowvram the weights sit in the offload hook
        self._save_original(okey, target.module, attr)
        self._dirty.add(okey)
        # sum every delta in float32 and round once, so several LoRAs on an fp16 layer lose no precision; an int8
        # weight (--quantize int8) is widened, patched and quantised again with fresh scales (the float original
        # is not kept; the exact int8 original comes back from the saved quantised copy)
        w = quantize.dequantised(param)
        total = torch.zeros_like(w)
        for delta, weight in target.entries:
            d = delta.weight_delta(w) if attr == "weight" else delta.bias_delta(w)
            if d is not None:
                total += d * weight
        patched = quantize.like(param, w + total)
        param.data.copy_(patched)
        return quantize.copy_of(patched) if keep else None


def _tensor_bytes(t) -> int:
    return quantize.tensor_bytes(t)


def patch_cache_bytes(settings) -> int:
    """The patched-set cache size from the ``lora_patch_cache_mb`` setting: MB; 0: off; negative (the default):
    a quarter of the RAM budget (one rank-32 LoRA over every SD1.5 layer touches 1.25 GB)."""
    mb = getattr(settings, "lora_patch_cache_mb", -1)
    if mb >= 0:
        return mb << 20
    from ..devices import ram_budget
    return ram_budget(settings) // 4


def patcher_for(components, settings=None) -> AdapterPatcher:
    """The one patcher of a Components (created on first use, stored on the object so it lives and dies with
    the loaded model). ``dict.setdefault`` keeps two racing callers on the same patcher. With ``settings`` the
    cache size follows the live setting (a change applies at the next ``apply``)."""
    patcher = components.__dict__.get("_adapter_patcher")
    if patcher is None:
        patcher = components.__dict__.setdefault("_adapter_patcher", AdapterPatcher(components))
    if settings is not None:
        patcher.cache_bytes = patch_cache_bytes(settings)
    return patcher


def patched_key(components) -> tuple:
    """The LoRA set patched into the weights of ``components`` (() when none); never creates a patcher."""
    patcher = components.__dict__.get("_adapter_patcher")
    return patcher.key if patcher is not None else ()


def held_bytes(components) -> int:
    """RAM the patcher of ``components`` holds (originals + cached sets); 0 if it has none (never creates one)."""
    patcher = components.__dict__.get("_adapter_patcher")
    return patcher.nbytes if patcher is not None else 0
