"""Open what the registry knows (single files, diffusers folders, VAEs) as LDM-keyed tensor sources, and pick
safe output paths inside the model folders."""
from __future__ import annotations

import os
from pathlib import Path

from .. import families
from ..errors import StudioError
from ..paths import plain_name
from .stio import DictSource, SafetensorsSource, TensorSource


def open_checkpoint(info) -> TensorSource:
    """A registry CheckpointInfo as a source of LDM-layout tensors (streamed for .safetensors)."""
    if info.kind == "hub":
        raise StudioError(f"{info.name!r} is a Hugging Face repo id; only local models can be merged.",
                          field="model", fix="download it into models/Stable-diffusion first")
    if info.kind == "diffusers":
        # a folder holds several files in diffusers naming: load it whole and re-express it as LDM keys
        from ..loading.diffusers_folder import load_diffusers_folder
        from ..loading.ldm_export import components_to_ldm
        return DictSource(components_to_ldm(load_diffusers_folder(info.path)))
    path = os.fspath(info.path)
    if path.lower().endswith(".safetensors"):
        return SafetensorsSource(path)
    from ..loading.ldm_config import normalize_keys
    from ..loading.state_dict import read_state_dict
    return DictSource(normalize_keys(read_state_dict(path)))


def family_of(source: TensorSource, name: str) -> str:
    return families.detect_ldm({k: v.shape for k, v in source.infos.items()}, name).name


def family_label(family: str | None) -> str:
    return families.label(family)


def vae_tensors(registry, name: str) -> dict:
    """A models/VAE entry as ``{ldm key without first_stage_model.: tensor}`` (VAE files are small)."""
    from ..loading.ldm_export import vae_to_ldm
    from ..loading.state_dict import read_state_dict

    info = registry.find_vae(name)
    path = info.path
    if info.kind == "diffusers":
        path = next((p for p in (Path(path) / "diffusion_pytorch_model.safetensors",
                                 Path(path) / "diffusion_pytorch_model.bin") if p.is_file()), None)
        if path is None:
            raise StudioError(f"VAE folder {info.name!r} has no weights file.", field="bake_vae", path=str(info.path))
    sd = read_state_dict(os.fspath(path))
    if any(k.startswith("encoder.down_blocks.") for k in sd):  # diffusers naming
        sd = vae_to_ldm({k: v for k, v in sd.items()
                         if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}, prefix="")
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("first_stage_model.").removeprefix("vae.")
        if not k.startswith("loss"):  # LDM VAE training checkpoints carry the discriminator
            out[k] = v
    return out


# file systems allow 255 bytes per name; the writer's temporary ".<name>.<pid>.tmp" needs room too
MAX_NAME_BYTES = 200


def output_path(folder: Path, name: str, *, ext: str | None, overwrite: bool, field: str = "output_name") -> Path:
    """``folder/name[.ext]``, refusing paths, hidden names and (unless ``overwrite``) existing entries."""
    clean = plain_name(name or "", field)
    if ext:
        for known in (".safetensors", ".ckpt", ".pt"):
            if clean.lower().endswith(known):
                clean = clean[: -len(known)]
        clean += ext
    size = len(clean.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise StudioError(f"Output name is {size} bytes long; the limit is {MAX_NAME_BYTES}.", field=field,
                          fix=f"use a shorter name (at most {MAX_NAME_BYTES} bytes)")
    try:
        clean.encode("utf-8")
    except UnicodeEncodeError:
        raise StudioError(f"Output name {name!a} holds a lone surrogate, which no file name can hold.", field=field,
                          fix="use plain text (valid UTF-8)") from None
    path = Path(folder) / clean
    if path.exists() and not overwrite:
        raise StudioError(f"{path.name!r} already exists in {folder}.", field=field, path=str(path),
                          fix="choose another name or allow overwriting")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return path
