"""Merge operations as jobs of the studio's one queue, shared by the Merge tab and the REST routes.

Torch-free at import: the engine functions are imported inside the job functions, so the UI and the API can
import this module at start-up. Each job returns a :class:`MergeOutcome`; progress goes to the job
(``ctx.set_progress``) and an interrupt stops the merge at the next tensor (the partial file is removed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

LORA_ACTIONS = ("bake", "merge", "resize", "extract")

# the engine's field names -> what the user sees in the Merge tab
FIELD_LABELS = {
    "model_a": "Primary model (A)", "model_b": "Secondary model (B)", "model_c": "Tertiary model (C)",
    "method": "Method", "multiplier": "Multiplier", "block_weights": "Block weights",
    "te_multiplier": "Text encoder multiplier", "output_name": "Output name", "output_format": "Format",
    "bake_vae": "Bake in VAE", "vae": "Bake in VAE", "discard": "Discard weights", "loras": "LoRAs",
    "checkpoint": "Checkpoint", "model": "Model", "mode": "Mode", "rank": "Rank", "conv_rank": "Conv rank",
    "param": "Parameter", "tuned": "Tuned model", "base": "Base model", "lora": "LoRA",
}


@dataclass
class MergeOutcome:
    """What a merge job made: a checkpoint (``title`` as the checkpoint list shows it) or a LoRA."""

    kind: str                                  # "checkpoint" | "lora"
    title: str
    path: Path
    notes: list[str] = field(default_factory=list)
    layers: dict = field(default_factory=dict)  # LoRA layer stem -> LayerStat (resize / merge / extract)
    energy: float | None = None                 # LoRA: kept share of Σ‖ΔW‖² over all layers


def field_label(name: str | None) -> str:
    return FIELD_LABELS.get(name or "", (name or "").replace("_", " ").capitalize())


def _progress(ctx: Any, what: str) -> Callable[[int, int, str], None]:
    def report(done: int, total: int, key: str) -> None:
        ctx.set_progress(done, total, textinfo=f"{what}: {100 * done // max(total, 1)}% · {key}")
        ctx.check()  # raises JobInterrupted: the engine removes its temporary file
    return report


def _checkpoint_outcome(studio: Any, path: Path, notes: list[str], ctx: Any) -> MergeOutcome:
    """Hash the new file now so its title ("name [hash]") is the one the checkpoint list keeps showing."""
    ctx.set_progress(0, 0, textinfo=f"Hashing {path.name}")
    info = studio.registry.find_checkpoint(path.relative_to(studio.settings.ckpt_path).as_posix())
    if info.kind == "file":
        studio.registry.ensure_hash(info)
    return MergeOutcome("checkpoint", info.title, path, list(notes))


def submit_checkpoint_merge(studio: Any, spec: Any) -> Any:
    """Queue ``merge_checkpoints(spec)``; the Job's result is a MergeOutcome."""
    def run(ctx: Any) -> MergeOutcome:
        from . import MergeReport, merge_checkpoints
        report = MergeReport()
        path = merge_checkpoints(spec, studio.registry, studio.settings, progress=_progress(ctx, "Merging"),
                                 report=report)
        return _checkpoint_outcome(studio, path, report.notes, ctx)
    names = " + ".join(n for n in (spec.a, spec.b, spec.c) if n)
    return studio.queue.submit(run, kind="merge", description=f"merge {names}")


def submit_lora(studio: Any, action: str, **kw: Any) -> Any:
    """Queue one LoRA tool: ``bake`` (checkpoint, loras, output_name, fp16, save_metadata, overwrite),
    ``merge`` (loras, output_name, mode, rank, conv_rank, clamp_quantile, fp16, overwrite), ``resize`` (lora,
    output_name, method, rank, conv_rank, param, fp16, overwrite) or ``extract`` (tuned, base, output_name, rank,
    conv_rank, clamp_quantile, min_diff, fp16, overwrite). ``loras``: [(name, weight)] or [(name, te, unet)]."""
    if action not in LORA_ACTIONS:
        from ..errors import StudioError
        raise StudioError(f"Unknown LoRA action {action!r}.", field="action",
                          fix=f"use one of {', '.join(LORA_ACTIONS)}")

    def run(ctx: Any) -> MergeOutcome:
        from . import MergeReport, bake_loras, extract_lora, merge_loras, resize_lora
        s, reg = studio.settings, studio.registry
        if action == "bake":
            report = MergeReport()
            path = bake_loras(reg, s, kw.pop("checkpoint"), kw.pop("loras"), kw.pop("output_name"),
                              progress=_progress(ctx, "Baking"), report=report, **kw)
            return _checkpoint_outcome(studio, path, report.notes, ctx)
        if action == "merge":
            res = merge_loras(s, kw.pop("loras"), kw.pop("output_name"), progress=_progress(ctx, "Merging"), **kw)
        elif action == "resize":
            res = resize_lora(s, kw.pop("lora"), kw.pop("output_name"), progress=_progress(ctx, "Resizing"), **kw)
        else:
            res = extract_lora(reg, s, kw.pop("tuned"), kw.pop("base"), kw.pop("output_name"),
                               progress=_progress(ctx, "Extracting"), **kw)
        studio.loras.refresh()  # listed among the extra networks at once
        return MergeOutcome("lora", res.path.stem, res.path, list(res.notes), dict(res.layers), res.energy)
    return studio.queue.submit(run, kind="merge", description=f"LoRA {action}")
