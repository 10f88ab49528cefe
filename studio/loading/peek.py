"""A checkpoint's family (and tensor shapes) from its header alone, for choices made before it is loaded (the
UI's generation defaults). Reads no tensor; None wherever that would need a full read."""
from __future__ import annotations

import os
from pathlib import Path

from .. import families
from ..errors import ModelLoadError


def _gguf_shapes(path: str) -> dict[str, tuple[int, ...]]:
    from gguf import GGUFReader     # memory-maps the file and parses its tensor table only
    # GGUF lists dimensions innermost first; torch (and safetensors headers) outermost first
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in GGUFReader(path).tensors}


def header_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape of a single-file checkpoint, with the names the loader normalises to."""
    from .ldm_config import linear_text_projection, normalize_keys
    from .state_dict import read_header_shapes
    lower = path.lower()
    if lower.endswith(".safetensors"):
        shapes = read_header_shapes(path)
    elif lower.endswith(".gguf"):
        shapes = _gguf_shapes(path)
    else:
        return None                 # a pickle has no header
    return linear_text_projection(normalize_keys(shapes), families.open_clip_prefixes())


def checkpoint_family(path: str | os.PathLike, kind: str) -> tuple[families.Family, dict | None] | None:
    """(family, header shapes or None) of a checkpoint file or diffusers folder, or None when its header cannot
    tell (a pickle, a hub name, an unreadable or unknown file: loading it gives the real message)."""
    path = os.fspath(path)
    try:
        if kind == "file":
            shapes = header_shapes(path)
            return (families.detect_ldm(shapes, path), shapes) if shapes else None
        if kind == "diffusers":
            from .diffusers_folder import folder_configs, read_json
            index = read_json(str(Path(path) / "model_index.json"))
            return families.detect_folder(index, folder_configs(path, index), path), None
    except (OSError, ValueError, KeyError, ModelLoadError):
        return None
    return None
