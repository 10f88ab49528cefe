"""Build diffusers components from a single-file (LDM layout) checkpoint, with configs read off the tensors.

Models are created with empty (meta) weights and the file's tensors are assigned into them, so weights are
held once. Key conversion uses diffusers' own ``single_file_utils`` functions.
"""
from __future__ import annotations

import os

import torch

from .. import families
from ..errors import ModelLoadError
from .components import Components
from .ldm_config import (UNET, clip_config, linear_text_projection, normalize_keys, open_clip_config,
                         read_sidecar_yaml, shapes_of, vae_config, vae_prefix, DEFAULT_VAE_SCALE)
from .state_dict import read_header_shapes, read_state_dict

PREDICTIONS = ("epsilon", "v_prediction")


# what the config derivation read off the tensors, named in the error when a module cannot be built from it
_SUMMARY_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "attention_head_dim",
                 "transformer_layers_per_block", "cross_attention_dim", "latent_channels", "norm_num_groups",
                 "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")


def describe_config(cfg: dict | None) -> str:
    return ", ".join(f"{k} {cfg[k]}" for k in _SUMMARY_KEYS if k in (cfg or {})) or "no layout"


def unsupported_layout(path: str, what: str, cfg: dict | None, exc: BaseException) -> ModelLoadError:
    """A module that diffusers / transformers refuse to build from the layout read off the file."""
    return ModelLoadError(
        f"{os.path.basename(path)}: the {what} cannot be built from the layout read off its tensors "
        f"({describe_config(cfg)}); unsupported: {exc}.", path=path,
        fix="this is not a standard SD 1 / 2 / XL layout (or the file is damaged); use a standard checkpoint "
            "or a diffusers folder with its config files.")


def build_module(cls_or_factory, state: dict, *, what: str, path: str, dtype, device, config: dict | None = None,
                 keep_dtypes: tuple = ()):
    """Create a module with empty weights and assign ``state`` into it, strictly (names and shapes).
    Tensors of ``keep_dtypes`` (fp8 storage) are assigned as stored, the others cast to ``dtype``."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            model = cls_or_factory()
    except (ValueError, TypeError, KeyError, IndexError, AssertionError, ZeroDivisionError, RuntimeError) as e:
        raise unsupported_layout(path, what, config, e) from e
    quantised = {k: v for k, v in state.items() if hasattr(v, "quant_type")}
    if quantised:   # GGUF: the linears with quantised weights become diffusers' GGUFLinear (dequantised per call)
        from diffusers.quantizers.gguf.utils import _replace_with_gguf_linear
        _replace_with_gguf_linear(model, dtype, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and
             tuple(getattr(state[k], "quant_shape", None) or state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ModelLoadError(
            f"{os.path.basename(path)}: the {what} weights do not fit the architecture read from the file "
            f"(missing {missing[:4]}{'…' if len(missing) > 4 else ''}, unexpected "
            f"{unexpected[:4]}{'…' if len(unexpected) > 4 else ''}, wrong shape {wrong[:4]}).", path=path,
            fix="the file is damaged or an unsupported variant; re-download it or use a diffusers folder.")
    state = {k: v.to(dtype) if v.is_floating_point() and v.dtype not in keep_dtypes else v for k, v in state.items()
             if k not in quantised}
    model.load_state_dict(state, strict=not quantised, assign=True)
    for key, param in quantised.items():   # set as they are: load_state_dict would compare byte shapes
        owner, _, name = key.rpartition(".")
        model.get_submodule(owner)._parameters[name] = param
    return model.to(device).eval()


def _clip_model(cls, cfg: dict):
    from transformers import CLIPTextConfig
    return lambda: cls(CLIPTextConfig(**cfg))


def _unwrap_text_model(model_cls, state: dict) -> dict:
    """transformers >= 5.6 flattened CLIPTextModel (no ``text_model.``); the projection model still wraps."""
    from transformers import CLIPTextModel
    if model_cls is CLIPTextModel:
        return {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def load_clip(sd: dict, prefix: str, *, path: str, dtype, device):
    """HF-named CLIP-L text encoder (SD1, SDXL's first) -> CLIPTextModel."""
    from transformers import CLIPTextModel
    shapes = shapes_of({k: v for k, v in sd.items() if k.startswith(prefix)})
    state = {"text_model." + k[len(prefix):]: v for k, v in sd.items()
             if k.startswith(prefix) and not k.endswith("position_ids")}
    cfg = clip_config(shapes, prefix)
    return build_module(_clip_model(CLIPTextModel, cfg), _unwrap_text_model(CLIPTextModel, state),
                        what="text encoder", path=path, dtype=dtype, device=device, config=cfg)


def load_clip_projection(sd: dict, prefix: str, *, path: str, dtype, device, hidden_act: str | None = None):
    """HF-named CLIP text encoder with its projection under ``prefix`` (``text_model.*`` + ``text_projection``;
    SD3's clip_l / clip_g) -> CLIPTextModelWithProjection. The activation cannot be read off the weights:
    OpenCLIP-G (1280 wide) uses gelu, CLIP-L quick_gelu, unless ``hidden_act`` says."""
    from transformers import CLIPTextModelWithProjection
    state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith("position_ids")}
    shapes = shapes_of(state)
    cfg = clip_config(shapes, "text_model.")
    cfg["projection_dim"] = int(shapes["text_projection.weight"][0])
    cfg["hidden_act"] = hidden_act or ("gelu" if cfg["hidden_size"] == 1280 else "quick_gelu")
    return build_module(_clip_model(CLIPTextModelWithProjection, cfg), state, what="CLIP text encoder", path=path,
                        dtype=dtype, device=device, config=cfg)


def load_open_clip(sd: dict, prefix: str, *, path: str, dtype, device, with_projection: bool,
                   drop_last: bool = False):
    """OpenCLIP text encoder -> CLIPTextModel or CLIPTextModelWithProjection; ``drop_last``: the model ends at the
    penultimate block (an encoder read there, as SD2's)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sub = {k: v for k, v in sd.items() if k.startswith(prefix)}
    cfg = open_clip_config(shapes_of(sub), prefix, drop_last=drop_last)
    if drop_last:
        last = f"{prefix}transformer.resblocks.{cfg['num_hidden_layers']}."
        sub = {k: v for k, v in sub.items() if not k.startswith(last) and k != prefix + "text_projection"}
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    # convert_open_clip_checkpoint only reads .config.hidden_size from the model it is given
    holder = type("ConfigHolder", (), {"config": CLIPTextConfig(**cfg)})()
    state = convert_open_clip_checkpoint(holder, sub, prefix=prefix)
    return build_module(_clip_model(cls, cfg), _unwrap_text_model(cls, state),
                        what="OpenCLIP text encoder", path=path, dtype=dtype, device=device, config=cfg)


def load_unet(sd: dict, cfg: dict, *, path: str, dtype, device):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    try:
        state = convert_ldm_unet_checkpoint(sd, cfg)
    except (ValueError, KeyError, IndexError, AssertionError, RuntimeError) as e:
        raise unsupported_layout(path, "UNet", cfg, e) from e
    return build_module(lambda: UNet2DConditionModel.from_config(cfg), state, what="UNet", path=path,
                        dtype=dtype, device=device, config=cfg)


def load_vae(sd: dict, cfg: dict, *, path: str, dtype, device, prefix: str = ""):
    """LDM VAE tensors (``prefix`` + encoder/decoder...) -> AutoencoderKL."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sub = {"first_stage_model." + k[len(prefix):]: v for k, v in sd.items()
           if k.startswith(prefix) and (k[len(prefix):].startswith(("encoder.", "decoder.", "quant_conv.",
                                                                     "post_quant_conv.")))}
    try:
        state = convert_ldm_vae_checkpoint(sub, cfg)
    except (ValueError, KeyError, IndexError, AssertionError, RuntimeError) as e:
        raise unsupported_layout(path, "VAE", cfg, e) from e
    return build_module(lambda: AutoencoderKL.from_config(cfg), state, what="VAE", path=path,
                        dtype=dtype, device=device, config=cfg)


def prediction_type(explicit: str | None, sidecar: dict, notes: list[str]) -> str:
    if explicit is not None:
        if explicit not in PREDICTIONS:
            raise ModelLoadError(f"Unknown prediction type {explicit!r}.", field="prediction",
                                 fix=f"use one of {PREDICTIONS}.")
        notes.append(f"prediction type {explicit} (set explicitly)")
        return explicit
    if "prediction_type" in sidecar:
        notes.append(f"prediction type {sidecar['prediction_type']} (from {os.path.basename(sidecar['yaml_path'])})")
        return sidecar["prediction_type"]
    notes.append("prediction type epsilon (default; cannot be read off the weights — add a sidecar .yaml "
                 "with parameterization: \"v\" or set it per model for v-prediction models)")
    return "epsilon"


def load_single_file(path, *, dtype=torch.float32, device="cpu", prediction: str | None = None,
                     companions: list | None = None) -> Components:
    """A single-file checkpoint -> Components (no network); its family decides how its parts are built.
    ``companions``: separate part files a transformer-only file may take (``loading.companions.find``'s list,
    or a function giving it, called only when a file needs them)."""
    path = os.fspath(path)
    if path.lower().endswith(".safetensors"):  # decide from the header before reading gigabytes
        families.detect_ldm(linear_text_projection(normalize_keys(read_header_shapes(path)),
                                                   families.open_clip_prefixes()), path)
    sd = linear_text_projection(normalize_keys(read_state_dict(path)), families.open_clip_prefixes())
    shapes = shapes_of(sd)
    family = families.detect_ldm(shapes, path)
    notes = [f"family {family.label} (read off the tensor layout)"]
    return family.load_single_file(path, sd, shapes, dtype=dtype, device=device, prediction=prediction,
                                   sidecar=read_sidecar_yaml(path), notes=notes, companions=companions)


def _diffusers_vae_config(shapes: dict, family: families.Family | None) -> dict:
    n = len({k.split(".")[2] for k in shapes if k.startswith("encoder.down_blocks.")})
    ch = [int(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0]) for i in range(n)]
    lpb = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.resnets.")})
    return {"in_channels": int(shapes["encoder.conv_in.weight"][1]),
            "out_channels": int(shapes["decoder.conv_out.weight"][0]),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": ch, "layers_per_block": lpb, "norm_num_groups": 32,
            "latent_channels": int(shapes["encoder.conv_out.weight"][0]) // 2,
            "scaling_factor": family.vae_scale if family else DEFAULT_VAE_SCALE}


def load_vae_file(path, dtype=torch.float32, device="cpu", family: str | families.Family | None = None):
    """A standalone VAE file (models/VAE): LDM keys with or without ``first_stage_model.``, or diffusers keys.
    ``family`` picks the latent scaling factor, since weights do not tell."""
    from diffusers import AutoencoderKL

    path = os.fspath(path)
    family = families.get(family)
    sd = read_state_dict(path)
    shapes = shapes_of(sd)
    try:
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes:  # diffusers format
            cfg = _diffusers_vae_config(shapes, family)
            state = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                                   "post_quant_conv."))}
            return build_module(lambda: AutoencoderKL.from_config(cfg), state, what="VAE", path=path,
                                dtype=dtype, device=device)
        pre = vae_prefix(shapes)
    except (KeyError, ModelLoadError) as e:
        if isinstance(e, ModelLoadError) and e.path:
            raise
        from .ldm_config import describe_non_checkpoint
        what, fix = describe_non_checkpoint(shapes)
        if any(k.startswith(UNET) for k in shapes):
            what, fix = "a full checkpoint", "put it in models/Stable-diffusion"
        raise ModelLoadError(f"{os.path.basename(path)} is not a VAE file; it looks like {what}.", path=path,
                             fix=fix + ".") from None
    return load_vae(sd, vae_config(shapes, family, pre), prefix=pre, path=path, dtype=dtype, device=device)
