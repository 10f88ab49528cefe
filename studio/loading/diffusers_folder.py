"""Load a diffusers folder (model_index.json + subfolders) into Components, local files only."""
from __future__ import annotations

import json
import os

import torch

from .. import families
from ..errors import ModelLoadError
from .components import Components
from .tokenizers import load_clip_tokenizer


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot read {path} ({e}).", path=path,
                             fix="the diffusers folder is incomplete or damaged; copy it again.") from e


def from_pretrained(loader, folder: str, sub: str, **kw):
    try:
        return loader(os.path.join(folder, sub), local_files_only=True, **kw)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers/diffusers raise OSError, ValueError, EnvironmentError, ...
        raise ModelLoadError(f"Cannot load {sub} from {folder} ({type(e).__name__}: {str(e)[:300]}).",
                             path=os.path.join(folder, sub),
                             fix="the diffusers folder is incomplete or damaged; copy or download it again.") from e


def folder_configs(path: str, index: dict) -> dict[str, dict]:
    """Subfolder -> its config.json, for the components model_index.json lists and the folder holds."""
    out = {}
    for name, spec in index.items():
        sub = os.path.join(path, name)
        if isinstance(spec, list) and spec and spec[0] is not None and os.path.isdir(sub):
            cfg = os.path.join(sub, "config.json")
            out[name] = read_json(cfg) if os.path.isfile(cfg) else {}
    return out


def load_diffusers_folder(path, dtype=torch.float32, device="cpu") -> Components:
    """A diffusers pipeline folder -> Components. Tokenizers come from the folder if present, else shipped."""
    path = os.fspath(path)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise ModelLoadError(f"{path} is not a diffusers folder (no model_index.json).", path=path,
                             fix="pick a folder that contains model_index.json, or a single .safetensors file.")
    index = read_json(index_path)
    configs = folder_configs(path, index)
    for need in ("vae",) + (() if "transformer" in configs else ("unet",)):
        if need not in configs:
            raise ModelLoadError(f"{path} has no {need}/ subfolder.", path=path,
                                 fix="the diffusers folder is incomplete; copy or download it again.")
    family = families.detect_folder(index, configs, path)
    notes = [f"family {family.name} (from the folder's text encoders, confirmed by cross-attention width)"]
    return family.load_folder(path, index, configs, dtype=dtype, device=device, notes=notes)


def tokenizer_of(path: str, sub: str, pad: str, notes: list[str]):
    """A folder's CLIP tokenizer, or the shipped one (with a note) when the folder has none."""
    folder = os.path.join(path, sub)
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "tokenizer.json")):
        from transformers import CLIPTokenizer
        return from_pretrained(CLIPTokenizer.from_pretrained, path, sub)
    notes.append(f"{sub}: not in the folder, using the shipped CLIP tokenizer (pad {pad!r})")
    return load_clip_tokenizer(pad)
