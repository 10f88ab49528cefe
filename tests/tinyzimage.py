"""Tiny seeded random Z-Image models and writers for the files users have: ComfyUI's three (the transformer alone
in Tongyi's key names, ``qwen_3_4b.safetensors``, the FLUX ``ae.safetensors``), an all-in-one of the same parts,
and a diffusers folder.

Sized to look like the real thing where a file cannot say otherwise: 128-wide attention heads with Z-Image's
32 + 48 + 48 rotary axes and 256-wide modulation, a Qwen3 text encoder with 128-wide heads, grouped key / value
heads, Qwen3-4B's vocabulary and rope, and FLUX's 16-channel VAE with its latent scale and shift.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from studio import families  # noqa: E402
from studio.families.zimage import PREFIX, TE_PREFIX, VAE_PREFIX  # noqa: E402
from studio.loading.components import Components  # noqa: E402
from studio.loading.qwen3 import QWEN3_FIXED  # noqa: E402
from studio.loading.tokenizers import load_qwen3_tokenizer  # noqa: E402
from tests.tinyflux import vae16  # noqa: E402
from tests.tinymodels import _jitter  # noqa: E402

TEXT_WIDTH = 64      # Qwen3 hidden width (Qwen3-4B: 2560), the transformer's cap_feat_dim


def make_tiny_zimage(seed: int = 0) -> Components:
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=256,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=TEXT_WIDTH, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
    # the pad tokens are zeros in a fresh model: real ones are trained, so give them values a mix-up would show
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    qwen = Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=TEXT_WIDTH, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                                  max_window_layers=3, **QWEN3_FIXED))
    vae = vae16(0.3611, 0.1159)
    return Components(family="zimage", unet=_jitter(transformer, seed), vae=_jitter(vae, seed + 30),
                      text_encoder=_jitter(qwen, seed + 10), tokenizer=load_qwen3_tokenizer(),
                      scheduler_config={"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0},
                      prediction_type="flow", in_channels=16, source=f"tiny-zimage-{seed}")


def to_tongyi(sd: dict, prefix: str = "") -> dict:
    """ZImageTransformer2DModel state dict -> Tongyi's names (the inverse of diffusers' single-file converter)."""
    renames = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
               (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
               (".attention.norm_k.", ".attention.k_norm."))
    out = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:   # q, k, v fused by rows
            out[prefix + k.replace(".to_q.", ".qkv.")] = torch.cat(
                [sd[k], sd[k.replace(".to_q.", ".to_k.")], sd[k.replace(".to_q.", ".to_v.")]])
            continue
        for ours, theirs in renames:
            k = k.replace(ours, theirs)
        out[prefix + k] = v
    return out


def qwen3_file_state(c: Components, prefix: str = "") -> dict:
    """Qwen3 tensors as ComfyUI's qwen_3_4b.safetensors names them (causal-LM names: ``model.*``)."""
    return {prefix + "model." + k: v for k, v in c.text_encoder.state_dict().items()}


def zimage_state_dict(c: Components, *, all_in_one: bool = False) -> dict:
    """The transformer alone (ComfyUI's diffusion_models file, unprefixed) or with its text encoder and VAE."""
    from studio.loading.ldm_export import vae_to_ldm
    if not all_in_one:
        return to_tongyi(c.unet.state_dict())
    sd = to_tongyi(c.unet.state_dict(), PREFIX)
    sd.update(qwen3_file_state(c, TE_PREFIX))
    sd.update(vae_to_ldm(c.vae.state_dict(), prefix=VAE_PREFIX))
    return sd


def _save(sd: dict, path) -> str:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, os.fspath(path))
    return os.fspath(path)


def write_zimage_single_file(c: Components, path, *, all_in_one: bool = False) -> str:
    return _save(zimage_state_dict(c, all_in_one=all_in_one), path)


def write_zimage_companions(c: Components, text_encoder_dir, vae_dir) -> tuple[str, str]:
    """ComfyUI's text_encoders/qwen_3_4b.safetensors and vae/ae.safetensors (LDM VAE names, unprefixed)."""
    from studio.loading.ldm_export import vae_to_ldm
    os.makedirs(text_encoder_dir, exist_ok=True)
    os.makedirs(vae_dir, exist_ok=True)
    return (_save(qwen3_file_state(c), os.path.join(text_encoder_dir, "qwen_3_4b.safetensors")),
            _save(vae_to_ldm(c.vae.state_dict(), prefix=""), os.path.join(vae_dir, "ae.safetensors")))


def write_zimage_folder(c: Components, path) -> str:
    """A diffusers ZImagePipeline folder (model_index.json + subfolders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = families.get("zimage").make_pipeline("txt2img", {
        **c.text_modules(), "vae": c.vae, "unet": c.unet,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config)})
    pipe.save_pretrained(os.fspath(path), safe_serialization=True)
    return os.fspath(path)
