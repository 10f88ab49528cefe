"""FLUX.1 (dev and schnell, Fill): a flow-matching DiT with CLIP-L (pooled) + T5-XXL (sequence) text encoders.

Files as users have them: BFL's own (transformer only, ``double_blocks.*``), ComfyUI's all-in-one
(``model.diffusion_model.`` + ``text_encoders.clip_l.transformer.`` + ``text_encoders.t5xxl.transformer.`` +
``vae.``) and diffusers folders. dev and schnell are one family (LoRAs are shared); the file tells them apart by
its guidance embedder (dev is guidance-distilled: the guidance scale is an input, not a second pass).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ModelLoadError
from . import flux_keys, flux_training
from .base import Family, Shapes, TextEncoder

CLIP_PREFIX = "text_encoders.clip_l.transformer.text_model."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."
KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
# FlowMatchEulerDiscreteScheduler as BFL ships it: dev shifts the schedule by image size, schnell does not
DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
# least-squares fit of VAE decodes on the 16 latent channels (ComfyUI's latent_formats.Flux)
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def transformer_config(shapes: Shapes, path: str = "") -> dict:
    """FluxTransformer2DModel config from BFL tensor shapes (prefix stripped)."""
    layout = flux_keys.layout_of(shapes)
    head = int(shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0])
    if head != 128:
        raise ModelLoadError(f"{os.path.basename(path)}: attention heads {head} wide; FLUX.1 uses 128 (its rotary "
                             "axes are 16 + 56 + 56).", path=path, fix="use a FLUX.1 dev / schnell / Fill checkpoint")
    return {"patch_size": 1, "in_channels": int(shapes["img_in.weight"][1]),
            "out_channels": int(shapes["final_layer.linear.weight"][0]),
            "num_layers": layout.double, "num_single_layers": layout.single, "attention_head_dim": head,
            "num_attention_heads": layout.inner // head, "joint_attention_dim": int(shapes["txt_in.weight"][1]),
            "pooled_projection_dim": int(shapes["vector_in.in_layer.weight"][1]),
            "guidance_embeds": layout.guidance, "axes_dims_rope": (16, 56, 56)}


def _fp8_dtype(sd: dict):
    """The fp8 dtype most of a state dict's weight matrices are stored in (e4m3fn / e5m2), or None."""
    import torch
    kinds = [v.dtype for k, v in sd.items() if k.endswith(".weight") and getattr(v, "ndim", 0) == 2]
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        if kinds and kinds.count(fp8) * 2 > len(kinds):
            return fp8
    return None


@dataclass(frozen=True)
class FluxFamily(Family):
    """FLUX.1: BFL / ComfyUI single files and diffusers folders."""

    def generation_defaults(self, components=None, shapes: Shapes | None = None) -> dict:
        out = super().generation_defaults(components, shapes)
        guidance, channels = True, 64
        if components is not None:
            guidance = getattr(components.unet.config, "guidance_embeds", True)
            channels = components.in_channels
        elif shapes:
            names = [k.removeprefix(flux_keys.PREFIX) for k in shapes]
            guidance = any(k.startswith("guidance_in.") for k in names)
            channels = next((int(shapes[k][1]) for k in shapes if k.endswith("img_in.weight")), channels)
        if not guidance:
            out["steps"] = 4      # schnell: timestep-distilled to 1-4 steps (BFL's model card)
        if channels == 384:
            out["distilled_cfg_scale"] = 30.0   # FLUX.1 Fill dev's guidance (BFL's and diffusers' examples)
        return out

    def ldm_score(self, shapes: Shapes) -> int:
        return 20 if KEY in shapes or flux_keys.PREFIX + KEY in shapes else 0

    def folder_score(self, index: dict, configs: dict[str, dict]) -> int:
        return 20 if configs.get("transformer", {}).get("_class_name") == "FluxTransformer2DModel" else 0

    def scheduler_config(self, guidance: bool) -> dict:
        return dict(DEV_SCHEDULER if guidance else SCHNELL_SCHEDULER)

    # ---- generation ------------------------------------------------------------------------------------------
    def accepts_channels(self, in_channels: int) -> bool:
        # 16 latent channels in 2x2 patches; Fill models add the masked image's (64) and the 8x8 mask's (256)
        return in_channels in (64, 384)

    def inpaint_from_pixels(self, in_channels: int) -> bool:
        # FluxFillPipeline takes either the image or masked latents, never both: with an image (strength < 1)
        # it masks and encodes the pixels itself, so it gets pixels at every strength
        return in_channels == 384

    def pipeline_mode(self, mode: str, in_channels: int) -> str:
        return "fill" if in_channels == 384 else mode

    def guidance_kwargs(self, request, components) -> dict:
        """Forge's split: ``distilled_cfg_scale`` is the model's guidance input (dev; schnell has none),
        ``cfg_scale`` above 1 runs real classifier-free guidance with the negative prompt (twice the cost)."""
        return {"guidance_scale": request.distilled_cfg_scale, "true_cfg_scale": request.cfg_scale}

    def make_scheduler(self, sampler: str, schedule: str, components):
        from ..samplers import make_flow_scheduler
        return make_flow_scheduler(sampler, schedule, components.scheduler_config)

    def pack_latents(self, latents):
        b, c, h, w = latents.shape
        return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2),
                                                                                            c * 4)

    def unpack_latents(self, latents, height: int, width: int):
        if latents.ndim == 4:
            return latents
        b, n, d = latents.shape
        h, w = height // 16, width // 16          # 8x VAE, then 2x2 patches
        return latents.view(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h * 2, w * 2)

    def lora_layer_names(self, denoiser) -> dict:
        """BFL names (kohya's ``lora_unet_double_blocks_0_img_attn_qkv``) and XLabs' processor names
        (``double_blocks_0_processor_qkv_lora1``): a fused q / k / v (+ MLP) layer is a ``FusedLayer`` over
        diffusers' separate modules, split by rows."""
        from ..adapters.keys import FusedLayer
        cfg = denoiser.config
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        single = denoiser.single_transformer_blocks
        layout = flux_keys.Layout(cfg.num_layers, cfg.num_single_layers, inner,
                                  single[0].proj_mlp.out_features if len(single) else 4 * inner, cfg.guidance_embeds)
        modules = dict(denoiser.named_modules())
        out = {}
        for bfl, parts in {**flux_keys.module_rows(layout), **flux_keys.xlabs_rows(layout)}.items():
            if bfl.endswith(("query_norm", "key_norm")) or not all(p in modules for p, _, _ in parts):
                continue
            name = bfl.replace(".", "_")
            out[name] = modules[parts[0][0]] if len(parts) == 1 else \
                FusedLayer([(modules[p], a, b) for p, a, b in parts])
        return out

    def merges(self, key: str) -> bool:
        """Every part of a FLUX file (ComfyUI's text-encoder keys have no "model" in their names)."""
        return True

    def lora_train_targets(self, denoiser, which: str):
        return flux_training.train_targets(denoiser)

    def kohya_lora_layers(self, layers, denoiser):
        return flux_training.kohya_layers(layers, denoiser)

    def training_condition(self, components, captions, modules):
        return flux_training.condition(self, components, captions, modules)

    def flow_prediction(self, denoiser, noisy, sigmas, cond, guidance):
        return flux_training.prediction(self, denoiser, noisy, sigmas, cond, guidance)

    def max_sequence_length(self, components) -> int:
        """T5 tokens per prompt, as BFL samples them: 512 for dev, 256 for schnell."""
        return 512 if getattr(components.unet.config, "guidance_embeds", True) else 256

    def load_single_file(self, path: str, sd: dict, shapes: Shapes, *, dtype, device, prediction: str | None,
                         sidecar: dict, notes: list[str], companions=None):
        from diffusers import FluxTransformer2DModel

        from ..loading.components import Components
        from ..loading.ldm_config import shapes_of, vae_config
        from ..loading.single_file import build_module, load_clip, load_vae
        from ..loading.t5 import load_t5
        from ..loading.tokenizers import load_clip_tokenizer, load_t5_tokenizer

        name = os.path.basename(path)
        if companions is not None and self._missing(shapes):
            sd = self._add_companions(sd, shapes, companions, notes)
            shapes = shapes_of(sd)
        missing = self._missing(shapes)
        if missing:
            raise ModelLoadError(f"{name} holds the FLUX.1 transformer only; {', '.join(w for w, _ in missing)} "
                                 "are not in it, and no separate file of the right width was found.", path=path,
                                 fix="put " + " and ".join(f for _, f in missing) + " beside it (text encoders in "
                                     "models/text_encoder, the VAE in models/VAE), or use an all-in-one FLUX.1 "
                                     "checkpoint or a diffusers folder")
        kw = dict(path=path, dtype=dtype, device=device)
        bfl = {k[len(flux_keys.PREFIX):]: v for k, v in sd.items() if k.startswith(flux_keys.PREFIX)} or \
            {k: v for k, v in sd.items() if not k.startswith(("text_encoders.", VAE_PREFIX))}
        cfg = transformer_config(shapes_of(bfl), path)
        if any(hasattr(v, "quant_type") for v in bfl.values()):
            kinds = sorted({getattr(v.quant_type, "name", str(v.quant_type)) for v in bfl.values()
                            if hasattr(v, "quant_type")})
            notes.append(f"GGUF transformer ({', '.join(kinds)}): kept quantised, dequantised layer by layer as it "
                         "runs (LoRAs are not applied to its quantised layers)")
        state = flux_keys.to_diffusers(bfl)
        fp8 = _fp8_dtype(bfl)
        keep = (fp8,) if fp8 is not None and dtype != fp8 else ()
        transformer = build_module(lambda: FluxTransformer2DModel.from_config(cfg), state, what="FLUX transformer",
                                   path=path, dtype=dtype, device=device, config=cfg, keep_dtypes=keep)
        if keep:
            # fp8 files stay fp8 in memory (half of bf16; never widened while loading), each layer cast up to
            # ``dtype`` as it runs (diffusers' layerwise casting). Exactly the layers whose weights the file stores
            # in fp8 are kept so (diffusers' defaults would widen the modulation linears, a quarter of FLUX); the
            # hook stores a layer whole, so those layers' biases are held in fp8 too
            import re

            from diffusers.hooks import apply_layerwise_casting
            wide = tuple(f"^{re.escape(k[:-len('.weight')])}$" for k, v in state.items()
                         if k.endswith(".weight") and v.dtype != fp8)
            apply_layerwise_casting(transformer, storage_dtype=fp8, compute_dtype=dtype,
                                    skip_modules_pattern=wide or ("^$",))
            notes.append(f"FLUX transformer weights kept in {str(fp8).replace('torch.', '')} as stored, computed "
                         f"in {str(dtype).replace('torch.', '')}")
        variant = "dev (guidance-distilled)" if cfg["guidance_embeds"] else "schnell (no guidance input)"
        notes.append(f"FLUX.1 {variant}" + (", Fill (inpainting)" if cfg["in_channels"] == 384 else ""))
        te = load_clip(sd, CLIP_PREFIX, **kw)
        t5 = load_t5(sd, T5_PREFIX, **kw)
        vae = load_vae(sd, vae_config(shapes, self, VAE_PREFIX), prefix=VAE_PREFIX, **kw)
        return Components(family=self.name, unet=transformer, vae=vae, text_encoder=te,
                          tokenizer=load_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=load_t5_tokenizer(),
                          scheduler_config=self.scheduler_config(cfg["guidance_embeds"]), prediction_type="flow",
                          in_channels=cfg["in_channels"], source=path, notes=notes)

    @staticmethod
    def _missing(shapes: Shapes) -> list[tuple[str, str]]:
        """(part, the file users keep it in) for each part a transformer-only file lacks."""
        parts = (("the CLIP-L text encoder", CLIP_PREFIX, "clip_l.safetensors"),
                 ("the T5-XXL text encoder", T5_PREFIX, "t5xxl_fp16.safetensors"),
                 ("the VAE", VAE_PREFIX + "decoder.", "ae.safetensors"))
        return [(what, file) for what, prefix, file in parts if not any(k.startswith(prefix) for k in shapes)]

    @staticmethod
    def _add_companions(sd: dict, shapes: Shapes, found, notes: list[str]) -> dict:
        """The missing parts from separate files (Forge's models/text_encoder, models/VAE), each chosen by the
        width the transformer reads: CLIP-L's pooled width, T5's sequence width."""
        from ..loading import companions
        bfl = flux_keys.strip(shapes)
        want = (("clip", CLIP_PREFIX, int(bfl["vector_in.in_layer.weight"][1]), ("clip_l",)),
                ("t5", T5_PREFIX, int(bfl["txt_in.weight"][1]), ("t5",)),
                ("vae16", VAE_PREFIX, 0, ("ae", "flux")))
        return companions.fill(sd, shapes, found, want, notes)

    def load_folder(self, path: str, index: dict, configs: dict[str, dict], *, dtype, device, notes: list[str]):
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        from ..loading.components import Components
        from ..loading.diffusers_folder import from_pretrained, read_json, tokenizer_of
        from ..loading.tokenizers import load_t5_tokenizer

        for need in ("text_encoder", "text_encoder_2"):
            if need not in configs:
                raise ModelLoadError(f"{path} has no {need}/ subfolder (FLUX.1 needs CLIP-L and T5-XXL).", path=path,
                                     fix="copy the whole diffusers folder")
        transformer = from_pretrained(FluxTransformer2DModel.from_pretrained, path, "transformer", torch_dtype=dtype)
        vae = from_pretrained(AutoencoderKL.from_pretrained, path, "vae", torch_dtype=dtype)
        te = from_pretrained(CLIPTextModel.from_pretrained, path, "text_encoder", dtype=dtype)
        t5 = from_pretrained(T5EncoderModel.from_pretrained, path, "text_encoder_2", dtype=dtype)
        tok2_dir = os.path.join(path, "tokenizer_2")
        if os.path.isdir(tok2_dir):
            tok2 = load_t5_tokenizer(tok2_dir)
        else:
            notes.append("tokenizer_2: not in the folder, using the shipped T5 tokenizer")
            tok2 = load_t5_tokenizer()
        sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
        guidance = bool(transformer.config.guidance_embeds)
        sched = read_json(sched_path) if os.path.isfile(sched_path) else self.scheduler_config(guidance)
        sched = {k: v for k, v in sched.items() if not k.startswith("_")}
        return Components(family=self.name, unet=transformer.to(device).eval(), vae=vae.to(device).eval(),
                          text_encoder=te.to(device).eval(), tokenizer=tokenizer_of(path, "tokenizer",
                                                                                    "<|endoftext|>", notes),
                          text_encoder_2=t5.to(device).eval(), tokenizer_2=tok2, scheduler_config=sched,
                          prediction_type="flow", in_channels=transformer.config.in_channels, source=path,
                          notes=notes)


FAMILY = FluxFamily(
    name="flux", label="FLUX.1", short="FLUX",
    text_encoders=(
        TextEncoder("text_encoder", "te1", CLIP_PREFIX, "clip", "<|endoftext|>", "lora_te1_"),
        # kohya's flux LoRAs name the T5 encoder lora_te3 (as for SD3), not lora_te2
        TextEncoder("text_encoder_2", "te3", T5_PREFIX, "t5", "<pad>", "lora_te3_", tokenizer_folder="tokenizer_2")),
    vae_scale=0.3611, vae_shift=0.1159, latent_channels=16, latent_rgb=FLUX_LATENT_RGB,
    latent_rgb_bias=FLUX_LATENT_RGB_BIAS,
    kohya_version="flux1", modelspec_arch="flux-1-dev", default_size=1024, real_text_widths=(768, 4096),
    controlnet=False, trains_embeddings=False, embeddings=False, denoiser="transformer", prompt_style="t5",
    kohya_network_module="networks.lora_flux", keeps_fp8=True,
    distilled_guidance=True, size_multiple=16,
    pipelines={"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline",
               "fill": "FluxFillPipeline"},
    aliases=("flux", "flux-1", "flux.1"),
    # Forge's "flux" preset: no real CFG (1), distilled guidance 3.5, Euler / Simple
    defaults={"steps": 20, "cfg_scale": 1.0, "distilled_cfg_scale": 3.5, "sampler_name": "Euler",
              "scheduler": "Simple"},
    lora_tops=("transformer_blocks", "single_transformer_blocks", "double_blocks", "single_blocks", "x_embedder",
               "context_embedder", "time_text_embed", "norm_out", "proj_out", "img_in", "txt_in", "time_in",
               "vector_in", "guidance_in", "final_layer"),
)
