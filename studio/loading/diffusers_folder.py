"""Load a diffusers folder (model_index.json + subfolders) into Components, local files only."""
from __future__ import annotations

import json
import os

import torch

from ..errors import ModelLoadError
from .components import Components
from .ldm_config import WIDTH_FAMILY, scheduler_config
from .tokenizers import load_clip_tokenizer, pad_token_for


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Cannot read {path} ({e}).", path=path,
                             fix="the diffusers folder is incomplete or damaged; copy it again.") from e


def _from_pretrained(loader, folder: str, sub: str, **kw):
    try:
        return loader(os.path.join(folder, sub), local_files_only=True, **kw)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers/diffusers raise OSError, ValueError, EnvironmentError, ...
        raise ModelLoadError(f"Cannot load {sub} from {folder} ({type(e).__name__}: {str(e)[:300]}).",
                             path=os.path.join(folder, sub),
                             fix="the diffusers folder is incomplete or damaged; copy or download it again.") from e


def folder_family(unet_cfg: dict, te_cfg: dict | None, has_te2: bool, path: str) -> str:
    """Family from which text encoders exist and their kind (layout first), confirmed by cross-attention width."""
    width = unet_cfg.get("cross_attention_dim")
    if has_te2:
        family = "sdxl" if te_cfg is not None else "sdxl_refiner"
    elif te_cfg is not None:
        family = "sd2" if te_cfg.get("hidden_act") == "gelu" else "sd1"  # OpenCLIP-H uses gelu, CLIP-L quick_gelu
    else:
        family = WIDTH_FAMILY.get(width)
        if family is None:
            raise ModelLoadError(f"{path}: no text encoder and unknown cross-attention width {width}.", path=path,
                                 fix="use a complete diffusers folder.")
    if family in ("sd1", "sd2") and te_cfg is not None and te_cfg.get("hidden_size") != width:
        raise ModelLoadError(f"{path}: the text encoder width {te_cfg.get('hidden_size')} does not match the "
                             f"UNet's cross-attention width {width}.", path=path,
                             fix="the folder mixes parts of different models; copy it again.")
    return family


def load_diffusers_folder(path, dtype=torch.float32, device="cpu") -> Components:
    """A diffusers pipeline folder -> Components. Tokenizers come from the folder if present, else shipped."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = os.fspath(path)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise ModelLoadError(f"{path} is not a diffusers folder (no model_index.json).", path=path,
                             fix="pick a folder that contains model_index.json, or a single .safetensors file.")
    index = _read_json(index_path)
    present = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None and
               os.path.isdir(os.path.join(path, k))}
    for need in ("unet", "vae"):
        if need not in present:
            raise ModelLoadError(f"{path} has no {need}/ subfolder.", path=path,
                                 fix="the diffusers folder is incomplete; copy or download it again.")
    te_cfg = _read_json(os.path.join(path, "text_encoder", "config.json")) if "text_encoder" in present else None
    unet_cfg = _read_json(os.path.join(path, "unet", "config.json"))
    family = folder_family(unet_cfg, te_cfg, "text_encoder_2" in present, path)
    notes = [f"family {family} (from the folder's text encoders, confirmed by cross-attention width)"]

    kw = dict(torch_dtype=dtype)
    unet = _from_pretrained(UNet2DConditionModel.from_pretrained, path, "unet", **kw)
    vae = _from_pretrained(AutoencoderKL.from_pretrained, path, "vae", **kw)
    te = te2 = tok = tok2 = None
    if te_cfg is not None:
        te = _from_pretrained(CLIPTextModel.from_pretrained, path, "text_encoder", dtype=dtype)
        tok = _tokenizer(path, "tokenizer", pad_token_for(family), notes)
    if "text_encoder_2" in present:
        te2 = _from_pretrained(CLIPTextModelWithProjection.from_pretrained, path, "text_encoder_2", dtype=dtype)
        tok2 = _tokenizer(path, "tokenizer_2", pad_token_for(family, second=True), notes)

    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    pred = _read_json(sched_path).get("prediction_type", "epsilon") if os.path.isfile(sched_path) else "epsilon"
    notes.append(f"prediction type {pred} (from the scheduler config)")
    in_ch = unet.config.in_channels
    return Components(family=family, unet=unet.to(device).eval(), vae=vae.to(device).eval(),
                      text_encoder=te.to(device).eval() if te is not None else None, tokenizer=tok,
                      scheduler_config=scheduler_config(pred),
                      text_encoder_2=te2.to(device).eval() if te2 is not None else None, tokenizer_2=tok2,
                      prediction_type=pred, in_channels=in_ch, source=path, notes=notes)


def _tokenizer(path: str, sub: str, pad: str, notes: list[str]):
    folder = os.path.join(path, sub)
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "tokenizer.json")):
        from transformers import CLIPTokenizer
        return _from_pretrained(CLIPTokenizer.from_pretrained, path, sub)
    notes.append(f"{sub}: not in the folder, using the shipped CLIP tokenizer (pad {pad!r})")
    return load_clip_tokenizer(pad)
