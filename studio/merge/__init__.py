"""Checkpoint and LoRA merging (the Merge tab's engine). Imports lazily: importing the package costs nothing.

- ``merge_checkpoints(MergeSpec, registry, settings, progress)``: weighted sum / add difference / no
  interpolation, block weights, fp16, VAE bake, discard regex, A1111 merge metadata; streamed.
- ``bake_loras`` / ``merge_loras`` / ``resize_lora`` / ``extract_lora``: LoRA operations (kohya output).
"""
from __future__ import annotations

_EXPORTS = {
    "MergeSpec": "checkpoints", "MergeReport": "checkpoints", "merge_checkpoints": "checkpoints",
    "METHODS": "checkpoints", "BLOCK_IDS": "blocks", "presets": "blocks", "parse_block_weights": "blocks",
    "bake_loras": "lora", "merge_loras": "lora", "resize_lora": "lora", "extract_lora": "lora",
    "find_lora": "lora", "LoraResult": "lora", "LayerStat": "lora", "StreamWriter": "stio",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
