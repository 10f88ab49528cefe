"""Tiny seeded random SD1 / SD2 / SDXL models for tests, and writers for the on-disk formats.

Head counts follow the loader's rule (SD1: 8 heads; SD2/SDXL: max(1, channels // 64)) because heads cannot be
read off the weights; a tiny model built otherwise would load with different attention. These models are
untrained (their images are coloured noise): fixtures that exercise every code path fast, never shipped.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from studio.loading.components import Components  # noqa: E402
from studio.loading.diffusers_export import make_pipeline, write_diffusers_folder  # noqa: E402,F401
from studio.loading.ldm_config import scheduler_config  # noqa: E402
from studio import families  # noqa: E402
from studio.loading.tokenizers import load_clip_tokenizer  # noqa: E402

CHANNELS = (32, 64)
VAE_CHANNELS = (32, 32, 64, 64)
TEXT_DIM = 32
TIME_DIM = 8  # SDXL addition_time_embed_dim


def _jitter(module, seed: int):
    """Perturb every parameter (norms included) so a swapped mapping cannot hide behind ones/zeros."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def _clip(seed: int, openclip: bool, projection: bool = False, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=layers,
                         num_attention_heads=max(1, TEXT_DIM // 64), vocab_size=49408,
                         max_position_embeddings=77, hidden_act="gelu" if openclip else "quick_gelu",
                         projection_dim=TEXT_DIM, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0 if openclip else 49407)
    torch.manual_seed(seed)
    return _jitter((CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg), seed)


def _unet(family: str, seed: int, in_channels: int):
    from diffusers import UNet2DConditionModel
    kw = dict(sample_size=32, in_channels=in_channels, out_channels=4, block_out_channels=CHANNELS,
              layers_per_block=1, norm_num_groups=32)
    if family == "sd1":
        kw.update(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                  attention_head_dim=8)
    elif family == "sd2":
        kw.update(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                  attention_head_dim=[max(1, c // 64) for c in CHANNELS], use_linear_projection=True,
                  layers_per_block=2)
    else:
        n_time = 6 if family == "sdxl" else 5
        kw.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=2 * TEXT_DIM if family == "sdxl" else TEXT_DIM,
                  attention_head_dim=[max(1, c // 64) for c in CHANNELS], use_linear_projection=True,
                  transformer_layers_per_block=[1, 2], addition_embed_type="text_time",
                  addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=TEXT_DIM + n_time * TIME_DIM)
    torch.manual_seed(seed)
    return _jitter(UNet2DConditionModel(**kw), seed)


def _vae(family: str, seed: int):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    # four levels like the real VAE, so latents are 1/8 of the image size as everywhere in SD
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=VAE_CHANNELS, layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=64,
                        scaling_factor=0.13025 if family.startswith("sdxl") else 0.18215)
    return _jitter(vae, seed)


def make_tiny(family: str, seed: int = 0, in_channels: int = 4, prediction_type: str = "epsilon") -> Components:
    """A tiny random model of ``family`` ("sd1", "sd2", "sdxl", "sdxl_refiner"), deterministic for a seed."""
    te = tok = te2 = tok2 = None
    spec = families.get(family)
    if family in ("sd1", "sdxl"):
        te = _clip(seed + 10, openclip=False)
    if family == "sd2":
        te = _clip(seed + 10, openclip=True, layers=3)
    if te is not None:
        tok = load_clip_tokenizer(spec.encoder("text_encoder").pad_token)
    if family in ("sdxl", "sdxl_refiner"):
        te2 = _clip(seed + 20, openclip=True, projection=True, layers=3)
        tok2 = load_clip_tokenizer(spec.encoder("text_encoder_2").pad_token)
    return Components(family=family, unet=_unet(family, seed, in_channels), vae=_vae(family, seed + 30),
                      text_encoder=te, tokenizer=tok, scheduler_config=scheduler_config(prediction_type),
                      text_encoder_2=te2, tokenizer_2=tok2, prediction_type=prediction_type,
                      in_channels=in_channels, source=f"tiny-{family}-{seed}")


def write_single_file(components: Components, path) -> str:
    """Write as an A1111 / LDM-layout .safetensors checkpoint."""
    from studio.loading.ldm_export import save_ldm_single_file
    return save_ldm_single_file(components, path)


BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "square", "photo", "of"]


def write_tiny_blip(folder, vocab_dir, say: str | None = "red"):
    """A random 1-layer BLIP with a real BERT tokenizer and image processor, saved like the hub folder."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    folder.mkdir(parents=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(BLIP_WORDS) + "\n")
    tok = BertTokenizer(str(vocab_dir / "vocab.txt"))
    proc = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    cfg = BlipConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
                     text_config=dict(vocab_size=len(BLIP_WORDS), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                      bos_token_id=2, sep_token_id=3, pad_token_id=0), projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg)
    if say:
        with torch.no_grad():  # a random model would end at once; this one says ``say`` every step
            bias = model.text_decoder.cls.predictions.bias
            bias.fill_(-50.0)
            bias[BLIP_WORDS.index(say)] = 50.0
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
