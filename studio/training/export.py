"""Write what was trained in the ecosystem's formats: kohya LoRA / LyCORIS ``.safetensors`` with ``ss_*`` /
``sshs_*`` / ``modelspec.*`` metadata, and A1111 embeddings. Files appear atomically (temp + os.replace).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import families
from .atomic import write_with
from .config import TrainConfig

_LORA = ("lora_A", "lora_B")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass
class RunInfo:
    """Facts about the run that go into the metadata."""

    family: str = ""             # the base model's family name
    prediction: str = "epsilon"
    steps: int = 0
    epoch: int = 0
    num_train_images: int = 0
    tag_frequency: dict = field(default_factory=dict)
    dataset_dirs: dict = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    base_hash: str = ""          # full sha256 of the base checkpoint file
    base_legacy_hash: str = ""   # A1111's old 8-hex hash
    num_epochs: int = 1          # kohya: ceil(max_train_steps / steps per epoch)
    max_train_steps: int = 0
    num_batches_per_epoch: int = 0
    num_reg_images: int = 0
    reg_dataset_dirs: dict = field(default_factory=dict)
    bucket_info: dict | None = None
    optimizer: str = ""          # kohya's spelling, e.g. torch.optim.adamw.AdamW(weight_decay=0.01)
    session_id: int = 0
    num_processes: int = 1


# ---- tensor names --------------------------------------------------------------------------------------------
def _unet_name(name: str, family: str, unet) -> str:
    if families.get(family).kohya_unet_ldm_names:
        # e.g. SDXL kohya files name UNet modules in the original (LDM) layout
        from ..loading.ldm_export import UNET_RESNET, UNET_TOP, _map_key, _unet_prefix_map
        name = _map_key(name + ".", {**UNET_TOP, **_unet_prefix_map(unet.config)}, UNET_RESNET)[:-1]
    return "lora_unet_" + name.replace(".", "_")


def _te_name(name: str, part: str, family: str) -> str:
    prefix = families.get(family).kohya_te_prefix(part)
    # kohya names text-encoder modules with ``text_model_`` even where transformers 5 dropped the wrapper
    name = name if name.startswith("text_model.") else "text_model." + name
    return prefix + name.replace(".", "_")


def tensors_of(module, adapter: str, *, detach: bool = True) -> dict[str, torch.Tensor]:
    """A peft layer's adapter tensors by attribute (``lora_A``, ``hada_w1_a``...): fp32 CPU copies, or with
    ``detach=False`` the parameters themselves (``refine`` writes into them)."""
    out = {}
    for attr in _LORA + _LOHA + _LOKR:
        holder = getattr(module, attr, None)
        if holder is None or adapter not in holder:
            continue
        t = holder[adapter]
        t = t.weight if isinstance(t, torch.nn.Module) else t
        out[attr] = t.detach().float().cpu() if detach else t
    return out


def layer_key(name: str, part: str, family: str, model) -> str:
    """The kohya / LyCORIS key prefix of module ``name`` of ``part`` ("unet", "text_encoder"...)."""
    return _unet_name(name, family, model) if part == "unet" else _te_name(name, part, family)


def file_rank(t: dict[str, torch.Tensor]) -> int | None:
    """The rank a layer's alpha is divided by (None: a LoKr layer with no decomposed factor, read at scale 1)."""
    if "lora_A" in t:
        return t["lora_A"].shape[0]
    if "hada_w1_a" in t:
        return t["hada_w1_b"].shape[0]
    return next((t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t), None)


def network_state_dict(modules: dict[str, Any], family: str, adapter: str = "default") -> dict[str, torch.Tensor]:
    """kohya / LyCORIS tensors for every peft-injected layer of ``modules`` ("unet", "text_encoder", ...).

    Alphas are written so that alpha / rank (as A1111, LyCORIS and our adapter engine read it) equals peft's
    scaling; a LoKr layer with no decomposed factor is read with scale 1, so its scaling is baked into w2."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, torch.Tensor] = {}
    for part, model in modules.items():
        layers = {}
        for name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            t = tensors_of(module, adapter)
            if not t:
                continue
            scaling = float(module.scaling[adapter])
            rank = file_rank(t)
            if "lora_A" in t:
                layer = {"lora_down.weight": t["lora_A"], "lora_up.weight": t["lora_B"]}
            else:
                if rank is None:
                    t["lokr_w2"] = t["lokr_w2"] * scaling
                    rank, scaling = 1, 1.0
                layer = dict(t)
            layer["alpha"] = torch.tensor(scaling * rank, dtype=torch.float32)
            layers[name] = layer
        fam = families.get(family)
        named = fam.kohya_lora_layers(layers, model) if part == "unet" and fam else None
        if named is None:
            named = {layer_key(name, part, family, model): layer for name, layer in layers.items()}
        for key, layer in named.items():
            out.update({f"{key}.{k}": v for k, v in layer.items()})
    return out


# ---- hashes --------------------------------------------------------------------------------------------------
def tensor_bytes_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(addnet hash, legacy hash) as kohya precomputes them: over the file with only the ``ss_*`` metadata.

    The addnet hash covers only the bytes after the header, so it equals ``hashes.addnet_hash_raw`` of the
    written file whatever other metadata it carries."""
    from safetensors.torch import save
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = struct.unpack("<Q", data[:8])[0]
    addnet = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return addnet, legacy


def base_hashes(path: str) -> tuple[str, str]:
    from ..hashes import legacy_model_hash, sha256_file
    if not os.path.isfile(path):
        return "", ""
    return sha256_file(path), legacy_model_hash(path)


# ---- metadata ------------------------------------------------------------------------------------------------
def bucket_info(items, plan) -> dict:
    """kohya's ``ss_bucket_info``: non-empty buckets by their index in the sorted bucket list, with the image
    count including repeats, and the mean |bucket aspect - image aspect| over the images (without repeats)."""
    index = {b: i for i, b in enumerate(plan.buckets)}
    buckets: dict[int, dict] = {}
    errors = []
    for item, size in zip(items, plan.sizes):
        i = index.get(size, len(index))
        b = buckets.setdefault(i, {"resolution": list(size), "count": 0})
        b["count"] += item.repeats
        errors.append(abs(size[0] / size[1] - item.width / item.height))
    return {"buckets": dict(sorted(buckets.items())),
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def _network_module(cfg, family: str) -> str:
    fam = families.get(family)
    if cfg.network_module == "networks.lora" and fam:
        return fam.kohya_network_module      # kohya's LoRA module of that family (FLUX: networks.lora_flux)
    return cfg.network_module


def _arch(family: str) -> str:
    fam = families.get(family)
    return fam.modelspec_arch if fam else family


def lora_metadata(cfg: TrainConfig, info: RunInfo) -> dict[str, str]:
    v = info.prediction == "v_prediction"
    # kohya: json.dumps of the --network_args key=value pairs, so every value is a string
    args = {"conv_dim": str(cfg.conv_rank), "conv_alpha": str(cfg.conv_alpha)} \
        if cfg.conv_rank or cfg.method == "locon" else {}
    if cfg.method in ("loha", "lokr"):
        args["algo"] = cfg.method
    fam = families.get(info.family)
    base = fam.kohya_base_version(info.prediction) if fam else info.family
    kind = "textual-inversion" if cfg.is_ti else "lora"
    meta = {
        "ss_output_name": cfg.output_name, "ss_network_module": _network_module(cfg, info.family),
        "ss_network_dim": str(cfg.rank), "ss_network_alpha": str(cfg.alpha),
        "ss_base_model_version": base, "ss_v2": str(bool(fam and fam.kohya_v2)),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})", "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.lr_for("unet")), "ss_text_encoder_lr": str(cfg.lr_for("text_encoder")),
        "ss_optimizer": info.optimizer or cfg.optimizer, "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_num_train_images": str(info.num_train_images), "ss_num_epochs": str(info.num_epochs),
        "ss_steps": str(info.steps), "ss_epoch": str(info.epoch), "ss_seed": str(cfg.seed),
        "ss_mixed_precision": cfg.mixed_precision, "ss_clip_skip": str(cfg.clip_skip),
        "ss_noise_offset": str(cfg.noise_offset), "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_tag_frequency": json.dumps(info.tag_frequency), "ss_dataset_dirs": json.dumps(info.dataset_dirs),
        "ss_sd_model_name": Path(cfg.base_model).name, "ss_sd_model_hash": info.base_legacy_hash,
        "ss_new_sd_model_hash": info.base_hash, "ss_training_started_at": str(info.started_at),
        "ss_training_finished_at": str(info.finished_at or time.time()),
        "ss_training_comment": f"trained by the studio ({cfg.method})",
        # the other keys kohya's train_network.py writes, where this run has the value
        "ss_session_id": str(info.session_id), "ss_network_dropout": "None", "ss_num_reg_images": str(info.num_reg_images),
        "ss_num_batches_per_epoch": str(info.num_batches_per_epoch),
        "ss_gradient_checkpointing": str(cfg.checkpointing),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum), "ss_max_train_steps": str(info.max_train_steps),
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps), "ss_full_fp16": "False",
        "ss_cache_latents": str(cfg.cache_latents != "none"), "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_caption_dropout_rate": str(cfg.caption_dropout), "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_zero_terminal_snr": "False", "ss_debiased_estimation": "False", "ss_loss_type": "l2",
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_total_batch_size": str(cfg.batch_size * cfg.grad_accum * info.num_processes),
        "ss_color_aug": "False", "ss_flip_aug": str(cfg.flip), "ss_random_crop": "False",
        "ss_shuffle_caption": str(cfg.shuffle_caption), "ss_enable_bucket": str(cfg.enable_buckets),
        # the limits the buckets were made with (plan_buckets never excludes the square one)
        "ss_bucket_no_upscale": "False", "ss_min_bucket_reso": str(min(cfg.min_bucket_reso, cfg.resolution)),
        "ss_max_bucket_reso": str(max(cfg.max_bucket_reso, cfg.resolution)), "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_reg_dataset_dirs": json.dumps(info.reg_dataset_dirs), "ss_bucket_info": json.dumps(info.bucket_info),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_arch(info.family)}{'-v' if v else ''}/{kind}",
        "modelspec.implementation": "diffusers", "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(info.finished_at or time.time())),
        "modelspec.prediction_type": "v" if v else "epsilon",
    }
    if info.prediction == "flow":    # what kohya's flux_train_network records of its flow options
        meta.update({"ss_timestep_sampling": cfg.timestep_sampling, "ss_discrete_flow_shift": str(cfg.discrete_flow_shift),
                     "ss_guidance_scale": str(cfg.guidance_scale), "ss_model_prediction_type": "raw",
                     "ss_sigmoid_scale": "1.0", "modelspec.prediction_type": "flow"})
    if cfg.network_weights:
        meta["studio.refined_from"] = Path(cfg.network_weights).name
        meta["ss_training_comment"] += f", refined from {Path(cfg.network_weights).name}"
    if args:   # kohya writes it only when network arguments were given
        meta["ss_network_args"] = json.dumps(args)
    # an embedding is triggered by its file name (A1111), not by the stand-in token it was trained with
    trigger = cfg.output_name if cfg.is_ti else (cfg.instance_prompt.split()[0] if cfg.instance_prompt else "")
    if not trigger:
        top = [t for freq in info.tag_frequency.values() for t in list(freq)[:1]]
        trigger = top[0] if top else ""
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    return meta


def _cast(tensors: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v).contiguous()
            for k, v in tensors.items()}


def save_lora(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
              dtype=torch.float32) -> Path:
    """Write a kohya-format file with the hashes filled in, atomically."""
    from safetensors.torch import save_file
    tensors = _cast(tensors, dtype)
    addnet, legacy = tensor_bytes_hashes(tensors, metadata)
    metadata = {**metadata, "sshs_model_hash": addnet, "sshs_legacy_hash": legacy}
    return write_with(path, lambda p: save_file(tensors, p, metadata=metadata))


def save_embedding(path: str | os.PathLike, rows: torch.Tensor | dict[str, torch.Tensor],
                   metadata: dict[str, str] | None = None) -> Path:
    """A1111-loadable embedding: ``emb_params`` [n, dim], or SDXL ``clip_l`` / ``clip_g`` given as a dict."""
    from safetensors.torch import save_file
    tensors = rows if isinstance(rows, dict) else {"emb_params": rows}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    return write_with(path, lambda p: save_file(tensors, p, metadata=metadata or {}))


CONTROLNET_FOLDER = "controlnet_diffusers"     # in the run folder: models/ControlNet would list it twice


def controlnet_metadata(cfg: TrainConfig, info: RunInfo) -> dict[str, str]:
    """What made a trained ControlNet: base model, condition, steps (modelspec keys plus the studio's own)."""
    v = info.prediction == "v_prediction"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_arch(info.family)}{'-v' if v else ''}/controlnet",
        "modelspec.implementation": "diffusers", "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(info.finished_at or time.time())),
        "studio.base_model": Path(cfg.base_model).name, "studio.base_model_hash": info.base_hash or "",
        "studio.preprocessor": "paired images" if cfg.conditioning == "folder" else cfg.conditioning,
        "studio.steps": str(info.steps), "studio.learning_rate": str(cfg.learning_rate),
        "studio.batch_size": str(cfg.batch_size), "studio.num_train_images": str(info.num_train_images),
        "studio.init": Path(cfg.controlnet_init).name if cfg.controlnet_init else "base UNet",
    }


def save_controlnet(path: str | os.PathLike, model, metadata: dict[str, str], dtype=torch.float32,
                    folder: str | os.PathLike | None = None) -> Path:
    """lllyasviel single file (``control_model.*``: A1111's ControlNet extension, ComfyUI, diffusers'
    ``from_single_file``), atomically; with ``folder`` also a diffusers ``save_pretrained`` folder."""
    from safetensors.torch import save_file

    from ..controlnet.convert import controlnet_to_ldm
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = _cast(controlnet_to_ldm(state, model.config), dtype)
    out = write_with(path, lambda p: save_file(tensors, p, metadata=metadata))
    if folder is not None:
        import shutil
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if next(model.parameters()).dtype != dtype:
            import copy
            model = copy.deepcopy(model).to(dtype)      # the trained copy stays in fp32
        model.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return out


def output_path(cfg: TrainConfig, step: int | None = None) -> Path:
    """``<output_dir>/<name>.safetensors``; intermediate saves get a kohya-style ``-000123`` step suffix."""
    suffix = f"-{step:06d}" if step is not None else ""
    return Path(cfg.output_dir) / f"{cfg.output_name}{suffix}.safetensors"


def save_preview(output: str | os.PathLike, samples: list[str | os.PathLike]) -> Path | None:
    """``<name>.preview.png`` beside the LoRA / embedding (A1111's extra-networks card): a copy of the newest
    sample (the first prompt of the last sampled step), unless a preview is already there (the user's stays)."""
    import re
    import shutil
    output = Path(output)
    preview = output.with_name(output.stem + ".preview.png")
    ranked = []
    for p in map(Path, samples):
        m = re.fullmatch(r"step(\d+)_(\d+)\.png", p.name)
        if m and p.is_file():
            ranked.append((-int(m[1]), int(m[2]), p))
    if preview.exists() or not ranked:
        return None
    src = min(ranked)[2]
    return write_with(preview, lambda tmp: shutil.copyfile(src, tmp))
