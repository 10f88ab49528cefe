"""Tiny seeded random SD3.5 models (Medium-style, with dual attention and qk norm) and writers: Stability's
all-in-one single file (``model.diffusion_model.joint_blocks.*`` + ``text_encoders.clip_l`` / ``clip_g`` /
``t5xxl`` + ``first_stage_model.``) and a diffusers folder. 64-wide heads everywhere, real vocabularies, a
16-channel VAE with SD3's scale and shift."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from studio.families.sd3 import CLIP_G, CLIP_L, T5, UNET, VAE  # noqa: E402
from studio.loading.components import Components  # noqa: E402
from studio.loading.tokenizers import load_clip_tokenizer, load_t5_tokenizer  # noqa: E402
from tests.tinyflux import _jitter, vae16  # noqa: E402


def make_tiny_sd3(seed: int = 0) -> Components:
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=256,
                                        caption_projection_dim=128, pooled_projection_dim=128, out_channels=16,
                                        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")

    def clip(width, act, pad):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=width // 64,
            vocab_size=49408, max_position_embeddings=77, hidden_act=act, projection_dim=64, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=pad))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=256, d_kv=64, d_ff=512, num_layers=1, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                 dropout_rate=0.0))
    vae = vae16(1.5305, 0.0609)
    return Components(family="sd3", unet=_jitter(transformer, seed), vae=_jitter(vae, seed + 30),
                      text_encoder=_jitter(clip(64, "quick_gelu", 49407), seed + 10), tokenizer=load_clip_tokenizer(),
                      text_encoder_2=_jitter(clip(128, "gelu", 0), seed + 11), tokenizer_2=load_clip_tokenizer("!"),
                      text_encoder_3=_jitter(t5, seed + 20), tokenizer_3=load_t5_tokenizer(),
                      scheduler_config={"num_train_timesteps": 1000, "shift": 3.0}, prediction_type="flow",
                      in_channels=16, source=f"tiny-sd3-{seed}")


def _swap(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def mmdit_to_stability(sd: dict, num_layers: int) -> dict:
    """SD3Transformer2DModel state dict -> Stability's MMDiT names (the inverse of diffusers' converter)."""
    out = {"pos_embed": sd["pos_embed.pos_embed"], "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
           "x_embedder.proj.bias": sd["pos_embed.proj.bias"]}
    ren = {"time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    for d, s in ren.items():
        for p in ("weight", "bias"):
            out[f"{s}.{p}"] = sd[f"{d}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
    for i in range(num_layers):
        t, b = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            out[b + f"x_block.attn.qkv.{p}"] = torch.cat([sd[t + f"attn.to_{q}.{p}"] for q in "qkv"])
            out[b + f"context_block.attn.qkv.{p}"] = torch.cat([sd[t + f"attn.add_{q}_proj.{p}"] for q in "qkv"])
            out[b + f"x_block.attn.proj.{p}"] = sd[t + f"attn.to_out.0.{p}"]
            out[b + f"x_block.adaLN_modulation.1.{p}"] = sd[t + f"norm1.linear.{p}"]
            ctx = sd[t + f"norm1_context.linear.{p}"]
            out[b + f"context_block.adaLN_modulation.1.{p}"] = _swap(ctx) if last else ctx
            out[b + f"x_block.mlp.fc1.{p}"] = sd[t + f"ff.net.0.proj.{p}"]
            out[b + f"x_block.mlp.fc2.{p}"] = sd[t + f"ff.net.2.{p}"]
            if not last:
                out[b + f"context_block.attn.proj.{p}"] = sd[t + f"attn.to_add_out.{p}"]
                out[b + f"context_block.mlp.fc1.{p}"] = sd[t + f"ff_context.net.0.proj.{p}"]
                out[b + f"context_block.mlp.fc2.{p}"] = sd[t + f"ff_context.net.2.{p}"]
            if t + f"attn2.to_q.{p}" in sd:
                out[b + f"x_block.attn2.qkv.{p}"] = torch.cat([sd[t + f"attn2.to_{q}.{p}"] for q in "qkv"])
                out[b + f"x_block.attn2.proj.{p}"] = sd[t + f"attn2.to_out.0.{p}"]
        for d, s in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                     ("attn.norm_added_q", "context_block.attn.ln_q"), ("attn.norm_added_k", "context_block.attn.ln_k"),
                     ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
            if t + d + ".weight" in sd:
                out[b + s + ".weight"] = sd[t + d + ".weight"]
    return out


def sd3_state_dict(c: Components) -> dict:
    from studio.loading.ldm_export import vae_to_ldm
    sd = {UNET + k: v for k, v in mmdit_to_stability(c.unet.state_dict(), c.unet.config.num_layers).items()}
    for prefix, te in ((CLIP_L, c.text_encoder), (CLIP_G, c.text_encoder_2)):
        sd.update({prefix + k: v for k, v in te.state_dict().items() if not k.endswith("position_ids")})
    sd.update({T5 + k: v for k, v in c.text_encoder_3.state_dict().items() if k != "encoder.embed_tokens.weight"})
    sd.update(vae_to_ldm(c.vae.state_dict(), prefix=VAE))
    return sd


def write_sd3_single_file(c: Components, path) -> str:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().clone() for k, v in sd3_state_dict(c).items()}, os.fspath(path))
    return os.fspath(path)
