"""How many bytes a checkpoint will take once loaded, from its file headers only (no tensor is read).

The manager makes room for a model before loading it: sized after loading, a switch past the budget briefly
holds the old models and the new one together (an OOM on a GPU).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import ModelLoadError
from .ldm_config import UNET, VAE_PREFIXES
from .state_dict import read_header

# the parts of an LDM single file the loader builds modules from (EMA copies, optimizer state, schedule buffers
# and the like are left on disk)
_TEXT_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")   # the last: ComfyUI all-in-one DiT files
_FLOATS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_BYTES = {**_FLOATS, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _tensor_bytes(entry: dict, float_size: int, keep_fp8: bool = False) -> int:
    """Loaded size: floating tensors are cast to the target dtype, others keep their own (and fp8 ones theirs
    where the family keeps fp8 weights as stored)."""
    code = entry.get("dtype", "F32")
    if keep_fp8 and code.startswith("F8_"):
        size = 1
    else:
        size = float_size if code in _FLOATS else _BYTES.get(code, 4)
    return math.prod(entry.get("shape") or [1]) * size


def _keeps_fp8(header: dict) -> bool:
    """Whether the family this header's tensors say keeps fp8 weights as stored (a guess is enough here: the
    manager corrects its count after loading)."""
    from .. import families
    try:
        return families.detect_ldm({k: v.get("shape", ()) for k, v in header.items()}).keeps_fp8
    except ModelLoadError:
        return False


def _safetensors_bytes(path: str, float_size: int, vae_float_size: int, prefixes: tuple[str, ...] | None) -> int:
    header, _meta = read_header(path)
    if prefixes is not None and not any(k.startswith(prefixes) for k in header):
        prefixes = None      # a denoiser-only file (FLUX / Z-Image transformers as ComfyUI publishes them)
    keep_fp8 = any(e.get("dtype", "").startswith("F8_") for e in header.values()) and _keeps_fp8(header)
    total = 0
    for key, entry in header.items():
        if prefixes is not None and not key.startswith(prefixes):
            continue
        total += _tensor_bytes(entry, vae_float_size if key.startswith(VAE_PREFIXES) else float_size, keep_fp8)
    return total


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors, other weight files) the loader reads: without a variant infix (``.fp16.``) when there are
    such files, as ``from_pretrained`` without ``variant=`` does."""
    safe = sorted(folder.glob("*.safetensors"))
    plain = [p for p in safe if "." not in p.stem]
    if plain or safe:
        return plain or safe, []
    bins = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    return [], [p for p in bins if "." not in p.stem] or bins


def checkpoint_bytes(path: str | os.PathLike, kind: str, float_size: int, vae_float_size: int) -> int | None:
    """Estimated bytes of a checkpoint's modules at ``float_size`` bytes per float (the VAE at
    ``vae_float_size``), or None when it cannot be told without loading (a hub repo, an unreadable header).

    A ``.ckpt`` pickle has no header to read: its file size stands in.
    """
    try:
        if kind == "file":
            p = os.fspath(path)
            if p.lower().endswith(".safetensors"):
                return _safetensors_bytes(p, float_size, vae_float_size, (UNET, *VAE_PREFIXES, *_TEXT_PREFIXES))
            return os.path.getsize(p)
        if kind == "diffusers":
            total = 0
            for sub in _COMPONENTS:
                folder = Path(path) / sub
                if not folder.is_dir():
                    continue
                safe, other = _weight_files(folder)
                size = vae_float_size if sub == "vae" else float_size
                total += sum(_safetensors_bytes(os.fspath(f), size, size, None) for f in safe)
                total += sum(f.stat().st_size for f in other)
            return total or None
    except (OSError, ModelLoadError):  # the loader will give the real message
        return None
    return None


# training leftovers some VAE files carry (the loader skips them); lllyasviel files may hold a whole SD model
# beside the ControlNet, of which only ``control_model.`` is loaded
_NOT_LOADED = ("loss.", "model_ema.")
_CONTROL = "control_model."


def module_bytes(path: str | os.PathLike, float_size: int) -> int | None:
    """Estimated bytes of one module (a VAE, a ControlNet) from its single file or diffusers folder, at
    ``float_size`` bytes per float; None when it cannot be told without loading. A pickle counts its file size."""
    try:
        p = Path(path)
        if p.is_dir():
            safe, other = _weight_files(p)
            total = sum(_safetensors_bytes(os.fspath(f), float_size, float_size, None) for f in safe)
            return (total + sum(f.stat().st_size for f in other)) or None
        if p.suffix.lower() != ".safetensors":
            return p.stat().st_size
        header, _meta = read_header(os.fspath(p))
        keys = [k for k in header if not k.startswith(_NOT_LOADED)]
        control = [k for k in keys if k.startswith(_CONTROL)]
        return sum(_tensor_bytes(header[k], float_size) for k in control or keys) or None
    except (OSError, ModelLoadError):  # the loader will give the real message
        return None
