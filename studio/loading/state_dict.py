"""Read tensors from checkpoint files safely: safetensors, or pickles loaded with ``weights_only=True`` only."""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

from ..errors import ModelLoadError
from ..lazy import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONVERT_FIX = "convert it to .safetensors with a trusted tool, or download the .safetensors version."


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise ModelLoadError(f"Model file not found: {path}.", path=path,
                             fix="check the file name, or rescan the model folders.")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path} is a folder, not a model file.", path=path,
                             fix="pick a .safetensors/.ckpt file, or load the folder as a diffusers model.")
    if os.path.getsize(path) == 0:
        raise ModelLoadError(f"Model file is empty (0 bytes): {path}.", path=path,
                             fix="the download or copy failed; download the file again.")


def read_header(path: str) -> tuple[dict, dict]:
    """(tensor entries, metadata) from a safetensors header without reading tensor data."""
    _check_file(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > size - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        end = max((max(v["data_offsets"]) for v in header.values()), default=0)
        if 8 + n + end > size:
            raise ValueError("file is shorter than its header says (truncated)")
    except (ValueError, struct.error, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not a valid .safetensors file ({e}).", path=path,
                             fix="the file is truncated or corrupt; download it again.") from e
    return header, meta


def read_header_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a .safetensors file, reading only its header."""
    header, _ = read_header(path)
    return {k: tuple(v["shape"]) for k, v in header.items()}


def read_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` strings of a .safetensors file ({} if none)."""
    return read_header(path)[1]


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    read_header(path)  # clear messages for truncated/corrupt files before safetensors' own errors
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu", backend="pread")
    except Exception as e:  # safetensors raises its own error types for bad files
        raise ModelLoadError(f"{path} could not be read as .safetensors ({e}).", path=path,
                             fix="the file is truncated or corrupt; download it again.") from e


def _read_gguf(path: str) -> dict[str, torch.Tensor]:
    """A GGUF file (llama.cpp's format, as ComfyUI-GGUF / city96 publish DiTs): quantised tensors stay quantised
    (diffusers' GGUFParameter: their ``quant_shape`` is the logical shape), F16 / F32 ones are plain tensors."""
    try:
        from diffusers.models.model_loading_utils import load_gguf_checkpoint
        return load_gguf_checkpoint(path, return_tensors=True)
    except ImportError as e:
        raise ModelLoadError(f"{os.path.basename(path)} is a GGUF file and the gguf package is missing.", path=path,
                             fix="run python launch.py once more (it installs gguf from requirements.txt)") from e
    except (ValueError, OSError, KeyError) as e:
        raise ModelLoadError(f"{path} could not be read as GGUF ({str(e)[:300]}).", path=path,
                             fix="the file is truncated, damaged, or uses a quantisation diffusers cannot read; "
                                 "download it again or pick a Q8_0 / Q4_K / Q5_K file") from e


def _read_pickle(path: str) -> dict:
    mmap = zipfile.is_zipfile(path)  # mmap only works for the zip-based torch format
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global outside the tensor allow-list; that is how code-running pickles show up
        if "global" in str(e).lower():
            raise ModelLoadError(f"refused: this pickle needs code to load ({path}); it was not executed.",
                                 path=path, fix=CONVERT_FIX) from e
        raise ModelLoadError(f"{path} is not a readable checkpoint (invalid pickle data).", path=path,
                             fix="the file is corrupt or not a model; download it again.") from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile,
            # random bytes make the weights-only unpickler fail in its own ways (an empty mark stack, …)
            IndexError, KeyError, TypeError, AttributeError, struct.error, MemoryError, RecursionError) as e:
        raise ModelLoadError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}).", path=path,
                             fix="the file is truncated or corrupt; download it again.") from e


def _flatten(obj, path: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` and keep tensors only."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) and \
                not isinstance(obj[key], torch.Tensor):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors.", path=path,
                             fix="this is not a model checkpoint.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on CPU. Raises ModelLoadError for anything unreadable or unsafe."""
    path = os.fspath(path)
    _check_file(path)
    if path.lower().endswith(".safetensors"):
        sd = _read_safetensors(path)
    elif path.lower().endswith(".gguf"):
        sd = _read_gguf(path)
    elif path.lower().endswith(PICKLE_SUFFIXES):
        sd = _flatten(_read_pickle(path), path)
    else:
        raise ModelLoadError(f"Unknown model file type: {path}.", path=path,
                             fix="use a .safetensors (preferred), .ckpt, .pt or .bin file.")
    if not sd:
        raise ModelLoadError(f"{path} contains no tensors.", path=path, fix="this is not a model checkpoint.")
    return sd
