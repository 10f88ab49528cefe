"""Tiny seeded random FLUX.1 models (dev / schnell) and writers for the files users have: the all-in-one
single file in BFL / ComfyUI key names, BFL's transformer-only file, and a diffusers folder.

Sized to look like the real thing where a file cannot say otherwise: 128-wide attention heads with FLUX's
16 + 56 + 56 rotary axes, 64-wide CLIP and T5 heads, the real CLIP / T5 vocabularies, a 16-channel VAE with 32
GroupNorm groups and no quant convs, FLUX's latent scale and shift.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from studio import families  # noqa: E402
from studio.families import flux_keys  # noqa: E402
from studio.families.flux import CLIP_PREFIX, T5_PREFIX, VAE_PREFIX  # noqa: E402
from studio.loading.components import Components  # noqa: E402
from studio.loading.tokenizers import load_clip_tokenizer, load_t5_tokenizer  # noqa: E402
from tests.tinymodels import _jitter  # noqa: E402,F401 - tinysd3 takes it from here too

WIDTH = 64          # CLIP-L and T5 widths (one 64-wide head each)


def vae16(scale: float, shift: float):
    """A 4-level, 16-latent-channel VAE without quant convs (FLUX's and SD3's layout)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(32, 32, 64, 64),
                         layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=64,
                         scaling_factor=scale, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def make_tiny_flux(seed: int = 0, guidance: bool = True, in_channels: int = 64) -> Components:
    """A tiny FLUX.1 dev (``guidance``) or schnell model; ``in_channels`` 384 makes a Fill model."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=64, num_layers=1,
                                         num_single_layers=1, attention_head_dim=128, num_attention_heads=1,
                                         joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH,
                                         guidance_embeds=guidance, axes_dims_rope=(16, 56, 56))
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, vocab_size=49408, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=WIDTH, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=WIDTH, d_kv=64, d_ff=128, num_layers=2, num_heads=1,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                 dropout_rate=0.0))
    vae = vae16(0.3611, 0.1159)
    fam = families.get("flux")
    return Components(family="flux", unet=_jitter(transformer, seed), vae=_jitter(vae, seed + 30),
                      text_encoder=_jitter(clip, seed + 10), tokenizer=load_clip_tokenizer(),
                      text_encoder_2=_jitter(t5, seed + 20), tokenizer_2=load_t5_tokenizer(),
                      scheduler_config=fam.scheduler_config(guidance), prediction_type="flow",
                      in_channels=in_channels, source=f"tiny-flux-{seed}")


def flux_state_dict(c: Components, *, all_in_one: bool = True) -> dict:
    """The BFL / ComfyUI single-file tensors (``all_in_one``: with text encoders and VAE, as ComfyUI saves)."""
    from studio.loading.ldm_export import vae_to_ldm
    sd = flux_keys.to_bfl(c.unet.state_dict(), prefix=flux_keys.PREFIX if all_in_one else "")
    if all_in_one:
        for k, v in c.text_encoder.state_dict().items():
            if not k.endswith("position_ids"):
                sd[CLIP_PREFIX + k.removeprefix("text_model.")] = v
        sd.update({T5_PREFIX + k: v for k, v in c.text_encoder_2.state_dict().items()
                   if k != "encoder.embed_tokens.weight"})   # tied to shared.weight; ComfyUI stores it once
        sd.update(vae_to_ldm(c.vae.state_dict(), prefix=VAE_PREFIX))
    return sd


def write_flux_single_file(c: Components, path, *, all_in_one: bool = True) -> str:
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous().clone() for k, v in flux_state_dict(c, all_in_one=all_in_one).items()}
    save_file(sd, os.fspath(path))
    return os.fspath(path)


def write_flux_folder(c: Components, path) -> str:
    """A diffusers FluxPipeline folder (model_index.json + subfolders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = families.get("flux").make_pipeline("txt2img", {
        **c.text_modules(), "vae": c.vae, "unet": c.unet,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config)})
    pipe.save_pretrained(os.fspath(path), safe_serialization=True)
    return os.fspath(path)


def write_flux_gguf(c: Components, path, quant: str = "Q8_0") -> str:
    """The transformer alone as city96's GGUF files hold it: BFL names, 2-D weights quantised, the rest F32."""
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    w = gguf.GGUFWriter(os.fspath(path), arch="flux")
    for name, t in flux_keys.to_bfl(c.unet.state_dict()).items():
        a = t.detach().float().numpy()
        if a.ndim == 2 and a.shape[1] % block == 0:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)
