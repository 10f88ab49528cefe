"""Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo): an MMDiT with CLIP-L + CLIP-G (pooled and sequence) and
T5-XXL text encoders, flow matching, a 16-channel VAE.

Files as Stability publishes them (``sd3.5_medium.safetensors``: ``model.diffusion_model.joint_blocks.*`` +
``text_encoders.clip_l`` / ``clip_g`` / ``t5xxl`` + ``first_stage_model.``) and diffusers folders. The transformer is
converted by diffusers' own ``convert_sd3_transformer_checkpoint_to_diffusers`` (it reads every size off the
tensors). Prompts are encoded by diffusers' ``StableDiffusion3Pipeline.encode_prompt``: A1111 emphasis is not
applied to SD3 prompts yet (the text is used as written, weights syntax removed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ModelLoadError
from .base import Family, Shapes, TextEncoder

UNET = "model.diffusion_model."
KEY = UNET + "joint_blocks.0.x_block.attn.qkv.weight"
CLIP_L = "text_encoders.clip_l.transformer."
CLIP_G = "text_encoders.clip_g.transformer."
T5 = "text_encoders.t5xxl.transformer."
VAE = "first_stage_model."
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
# least-squares fit of VAE decodes on the 16 latent channels (ComfyUI's latent_formats.SD3)
SD3_LATENT_RGB = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
)


def transformer_config(shapes: Shapes) -> dict:
    """SD3Transformer2DModel config from Stability-named tensor shapes (``model.diffusion_model.`` stripped)."""
    import re
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.", k)))
    dual = tuple(sorted({int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.") and ".attn2." in k}))
    inner, in_ch, patch = (int(x) for x in shapes["x_embedder.proj.weight"][:3])
    head = int(shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0]) if "joint_blocks.0.x_block.attn.ln_q.weight" \
        in shapes else 64
    pos = int(shapes["pos_embed"][1])
    return {"sample_size": 128, "patch_size": patch, "in_channels": in_ch, "num_layers": layers,
            "attention_head_dim": head, "num_attention_heads": inner // head,
            "joint_attention_dim": int(shapes["context_embedder.weight"][1]), "caption_projection_dim": inner,
            "pooled_projection_dim": int(shapes["y_embedder.mlp.0.weight"][1]),
            "out_channels": int(shapes["final_layer.linear.weight"][0]) // (patch * patch),
            "pos_embed_max_size": int(round(pos ** 0.5)), "dual_attention_layers": dual,
            "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None}


@dataclass(frozen=True)
class SD3Family(Family):
    """SD3 / SD3.5 single files and diffusers folders."""

    def ldm_score(self, shapes: Shapes) -> int:
        return 20 if KEY in shapes else 0

    def folder_score(self, index: dict, configs: dict[str, dict]) -> int:
        return 20 if configs.get("transformer", {}).get("_class_name") == "SD3Transformer2DModel" else 0

    def accepts_channels(self, in_channels: int) -> bool:
        return in_channels == 16

    def pipeline_mode(self, mode: str, in_channels: int) -> str:
        return mode

    def make_scheduler(self, sampler: str, schedule: str, components):
        from ..samplers import make_flow_scheduler
        return make_flow_scheduler(sampler, schedule, components.scheduler_config)

    def merges(self, key: str) -> bool:
        return True

    def encode_text(self, components, text: str):
        """(sequence, pooled) for one text, by diffusers' own SD3 encoding (CLIP-L + CLIP-G + T5, 256 tokens)."""
        from diffusers import StableDiffusion3Pipeline
        pipe = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **components.text_modules())
        z, _, pooled, _ = pipe.encode_prompt(text, None, None, do_classifier_free_guidance=False,
                                             max_sequence_length=256, device=components.text_encoder.device)
        return z, pooled

    def lora_layer_names(self, denoiser) -> dict:
        """Stability's MMDiT names, as kohya sd-scripts' ``sd3_train_network`` writes them
        (``lora_unet_joint_blocks_0_x_block_attn_qkv``): a fused q / k / v is a ``FusedLayer`` over diffusers'
        separate modules, split by rows. diffusers 0.42 reads only its own names for SD3 LoRAs. Left out: the
        two modulations whose halves diffusers stores swapped (the final layer's and the last block's context
        one); a file's layers there are reported as unknown."""
        from ..adapters.keys import FusedLayer
        modules = dict(denoiser.named_modules())
        out = {}

        def add(name: str, *parts: str) -> None:
            if not all(p in modules for p in parts):
                return
            if len(parts) == 1:
                out[name.replace(".", "_")] = modules[parts[0]]
                return
            rows, start = [], 0
            for p in parts:
                n = modules[p].weight.shape[0]
                rows.append((modules[p], start, start + n))
                start += n
            out[name.replace(".", "_")] = FusedLayer(rows)

        for ours, theirs in (("pos_embed.proj", "x_embedder.proj"), ("context_embedder", "context_embedder"),
                             ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                             ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                             ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                             ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
                             ("proj_out", "final_layer.linear")):
            add(theirs, ours)
        last = len(denoiser.transformer_blocks) - 1
        for i in range(len(denoiser.transformer_blocks)):
            t, b = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            add(b + "x_block.attn.qkv", *(t + f"attn.to_{q}" for q in "qkv"))
            add(b + "context_block.attn.qkv", *(t + f"attn.add_{q}_proj" for q in "qkv"))
            add(b + "x_block.attn2.qkv", *(t + f"attn2.to_{q}" for q in "qkv"))
            for theirs, ours in (("x_block.attn.proj", "attn.to_out.0"), ("x_block.attn2.proj", "attn2.to_out.0"),
                                 ("context_block.attn.proj", "attn.to_add_out"),
                                 ("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2"),
                                 ("context_block.mlp.fc1", "ff_context.net.0.proj"),
                                 ("context_block.mlp.fc2", "ff_context.net.2"),
                                 ("x_block.adaLN_modulation.1", "norm1.linear")):
                add(b + theirs, t + ours)
            if i != last:
                add(b + "context_block.adaLN_modulation.1", t + "norm1_context.linear")
        return out

    def load_single_file(self, path: str, sd: dict, shapes: Shapes, *, dtype, device, prediction: str | None,
                         sidecar: dict, notes: list[str], companions=None):
        from diffusers import SD3Transformer2DModel
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        from ..loading.components import Components
        from ..loading.ldm_config import vae_config
        from ..loading.single_file import build_module, load_clip_projection, load_vae
        from ..loading.t5 import load_t5
        from ..loading.tokenizers import load_clip_tokenizer, load_t5_tokenizer

        missing = [what for what, prefix in (("CLIP-L", CLIP_L), ("CLIP-G", CLIP_G), ("T5-XXL", T5),
                                             ("the VAE", VAE)) if not any(k.startswith(prefix) for k in shapes)]
        if missing:
            raise ModelLoadError(f"{os.path.basename(path)} has no {', '.join(missing)}; the studio reads SD3 files "
                                 "with their text encoders and VAE included (as Stability publishes "
                                 "sd3.5_medium.safetensors and sd3.5_large.safetensors).", path=path,
                                 fix="use the all-in-one SD3.5 file or a diffusers folder")
        kw = dict(path=path, dtype=dtype, device=device)
        mmdit = {k[len(UNET):]: v for k, v in sd.items() if k.startswith(UNET)}
        cfg = transformer_config({k: tuple(v.shape) for k, v in mmdit.items()})
        state = convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit))
        transformer = build_module(lambda: SD3Transformer2DModel.from_config(cfg), state, what="SD3 transformer",
                                   config=cfg, **kw)
        notes.append(f"SD3 MMDiT: {cfg['num_layers']} blocks, {cfg['num_attention_heads']} heads" +
                     (f", dual attention in {len(cfg['dual_attention_layers'])} (SD3.5 Medium)"
                      if cfg["dual_attention_layers"] else ""))
        te = load_clip_projection(sd, CLIP_L, hidden_act="quick_gelu", **kw)
        te2 = load_clip_projection(sd, CLIP_G, hidden_act="gelu", **kw)
        t5 = load_t5(sd, T5, **kw)
        vae = load_vae(sd, vae_config(shapes, self, VAE), prefix=VAE, **kw)
        return Components(family=self.name, unet=transformer, vae=vae, text_encoder=te,
                          tokenizer=load_clip_tokenizer(), text_encoder_2=te2,
                          tokenizer_2=load_clip_tokenizer("!"), text_encoder_3=t5, tokenizer_3=load_t5_tokenizer(),
                          scheduler_config=dict(SCHEDULER), prediction_type="flow", in_channels=cfg["in_channels"],
                          source=path, notes=notes)

    def load_folder(self, path: str, index: dict, configs: dict[str, dict], *, dtype, device, notes: list[str]):
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        from ..loading.components import Components
        from ..loading.diffusers_folder import from_pretrained, read_json, tokenizer_of
        from ..loading.tokenizers import load_t5_tokenizer

        for need in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if need not in configs:
                raise ModelLoadError(f"{path} has no {need}/ subfolder (SD3 needs CLIP-L, CLIP-G and T5-XXL).",
                                     path=path, fix="copy the whole diffusers folder")
        transformer = from_pretrained(SD3Transformer2DModel.from_pretrained, path, "transformer", torch_dtype=dtype)
        vae = from_pretrained(AutoencoderKL.from_pretrained, path, "vae", torch_dtype=dtype)
        te = from_pretrained(CLIPTextModelWithProjection.from_pretrained, path, "text_encoder", dtype=dtype)
        te2 = from_pretrained(CLIPTextModelWithProjection.from_pretrained, path, "text_encoder_2", dtype=dtype)
        t5 = from_pretrained(T5EncoderModel.from_pretrained, path, "text_encoder_3", dtype=dtype)
        tok3_dir = os.path.join(path, "tokenizer_3")
        tok3 = load_t5_tokenizer(tok3_dir) if os.path.isdir(tok3_dir) else load_t5_tokenizer()
        sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
        sched = read_json(sched_path) if os.path.isfile(sched_path) else dict(SCHEDULER)
        return Components(family=self.name, unet=transformer.to(device).eval(), vae=vae.to(device).eval(),
                          text_encoder=te.to(device).eval(),
                          tokenizer=tokenizer_of(path, "tokenizer", "<|endoftext|>", notes),
                          text_encoder_2=te2.to(device).eval(), tokenizer_2=tokenizer_of(path, "tokenizer_2", "!",
                                                                                         notes),
                          text_encoder_3=t5.to(device).eval(), tokenizer_3=tok3,
                          scheduler_config={k: v for k, v in sched.items() if not k.startswith("_")},
                          prediction_type="flow", in_channels=transformer.config.in_channels, source=path,
                          notes=notes)


FAMILY = SD3Family(
    name="sd3", label="SD 3.x", short="SD3",
    text_encoders=(
        TextEncoder("text_encoder", "te1", CLIP_L + "text_model.", "clip", "<|endoftext|>", "lora_te1_",
                    with_projection=True),
        TextEncoder("text_encoder_2", "te2", CLIP_G + "text_model.", "clip", "!", "lora_te2_", with_projection=True,
                    tokenizer_folder="tokenizer_2"),
        TextEncoder("text_encoder_3", "te3", T5, "t5", "<pad>", "lora_te3_", tokenizer_folder="tokenizer_3")),
    vae_scale=1.5305, vae_shift=0.0609, latent_channels=16, latent_rgb=SD3_LATENT_RGB,
    latent_rgb_bias=(0.2394, 0.2135, 0.1925),
    kohya_version="sd3", modelspec_arch="stable-diffusion-v3", default_size=1024, real_text_widths=(768, 1280, 4096),
    controlnet=False, trains_embeddings=False, trains_lora=False, embeddings=False, denoiser="transformer",
    prompt_style="diffusers",
    size_multiple=16,
    pipelines={"txt2img": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline",
               "inpaint": "StableDiffusion3InpaintPipeline"},
    aliases=("sd3", "sd_3", "stable-diffusion-3", "sd3.5", "sd35"),
    # Stability's SD3.5 Large / Medium model cards: 28 steps at CFG 4.5 (3.5 Large's 40 at 3.5 fits too)
    defaults={"steps": 28, "cfg_scale": 4.5, "sampler_name": "Euler", "scheduler": "Simple"},
    lora_tops=("transformer_blocks", "joint_blocks", "pos_embed", "context_embedder", "time_text_embed",
               "norm_out", "proj_out", "x_embedder", "final_layer"),
)
