"""Tiny randomly initialised SD1 / SD2 / SDXL models: the ``--demo`` checkpoint and the test fixtures.

Head counts follow the loader's rule (SD1: 8 heads; SD2/SDXL: max(1, channels // 64)) because heads cannot be
read off the weights; a tiny model built otherwise would load with different attention. These models are
untrained: their images are coloured noise, which is all a demo needs to show every tab working offline.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .loading.components import Components
from .loading.ldm_config import scheduler_config
from .loading.tokenizers import load_clip_tokenizer, pad_token_for
from .settings import Settings

DEMO_NAME = "demo-untrained.safetensors"
TRAINED_NAME = "demo-shapes.safetensors"
TRAINED_FILE = Path(__file__).resolve().parent / "demo_assets" / TRAINED_NAME

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
    if family in ("sd1", "sdxl"):
        te, tok = _clip(seed + 10, openclip=False), load_clip_tokenizer(pad_token_for(family))
    if family == "sd2":
        te, tok = _clip(seed + 10, openclip=True, layers=3), load_clip_tokenizer(pad_token_for(family))
    if family in ("sdxl", "sdxl_refiner"):
        te2 = _clip(seed + 20, openclip=True, projection=True, layers=3)
        tok2 = load_clip_tokenizer(pad_token_for(family, second=True))
    return Components(family=family, unet=_unet(family, seed, in_channels), vae=_vae(family, seed + 30),
                      text_encoder=te, tokenizer=tok, scheduler_config=scheduler_config(prediction_type),
                      text_encoder_2=te2, tokenizer_2=tok2, prediction_type=prediction_type,
                      in_channels=in_channels, source=f"tiny-{family}-{seed}")


def create_demo_checkpoint(settings: Settings) -> Path:
    """Write the untrained demo checkpoint into the checkpoint folder (once) and return its path."""
    from .loading.ldm_export import save_ldm_single_file

    path = settings.ckpt_path / DEMO_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_ldm_single_file(make_tiny("sd1", seed=0), path,
                             metadata={"modelspec.title": "Untrained demo model (random weights)"})
    return path


def install_demo_model(settings: Settings) -> Path:
    """Copy the trained demo model (studio/demo_assets) into the checkpoint folder (once) and return its path."""
    import shutil

    path = settings.ckpt_path / TRAINED_NAME
    if not path.exists() or path.stat().st_size != TRAINED_FILE.stat().st_size:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        shutil.copyfile(TRAINED_FILE, tmp)
        os.replace(tmp, path)   # a half-copied file never shows in the checkpoint list
    return path


def is_demo_checkpoint(name: str) -> bool:
    """True for the untrained demo model (its images are labelled as such)."""
    return Path(name.split(" [")[0]).name == DEMO_NAME


def write_single_file(components: Components, path) -> str:
    """Write as an A1111 / LDM-layout .safetensors checkpoint."""
    from studio.loading.ldm_export import save_ldm_single_file
    return save_ldm_single_file(components, path)


def make_pipeline(c: Components, scheduler=None):
    """A diffusers txt2img pipeline over the components (no safety checker)."""
    from diffusers import (DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)
    sched = scheduler or DDIMScheduler.from_config(c.scheduler_config)
    if c.family in ("sd1", "sd2"):
        return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if c.family == "sdxl":
        return StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                         tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                         scheduler=sched)
    return StableDiffusionXLImg2ImgPipeline(vae=c.vae, text_encoder=None, text_encoder_2=c.text_encoder_2,
                                            tokenizer=None, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                            scheduler=sched, requires_aesthetics_score=True)


def write_diffusers_folder(components: Components, path) -> str:
    """Write as a diffusers folder (model_index.json + safetensors)."""
    make_pipeline(components).save_pretrained(os.fspath(path), safe_serialization=True)
    return os.fspath(path)
