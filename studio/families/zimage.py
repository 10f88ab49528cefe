"""Z-Image (Tongyi-MAI Z-Image / Z-Image-Turbo): a single-stream DiT (S3-DiT) conditioned on Qwen3-4B's
penultimate hidden states, flow matching, FLUX's 16-channel VAE.

Files as users have them: ComfyUI's three (``diffusion_models/z_image_turbo_bf16.safetensors``, the transformer
alone in Tongyi's key names, with or without ``model.diffusion_model.``; ``text_encoders/qwen_3_4b.safetensors``;
``vae/ae.safetensors``), an all-in-one of the same parts, and diffusers folders. The transformer is converted by
diffusers' own ``convert_z_image_transformer_checkpoint_to_diffusers``; prompts are encoded by
``ZImagePipeline.encode_prompt`` (Qwen3's chat template, one sequence per prompt at its own length): A1111
emphasis is not applied to Z-Image prompts (the text is used as written, weights syntax removed).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import ModelLoadError
from .base import Family, Shapes, TextEncoder
from .flux import FLUX_LATENT_RGB, FLUX_LATENT_RGB_BIAS

PREFIX = "model.diffusion_model."
KEY = "layers.0.adaLN_modulation.0.weight"     # the main blocks' modulation (Lumina 2's is at .1, after a SiLU)
CAP = "cap_embedder.1.weight"                  # caption projection: [dim, Qwen3 width]
TE_PREFIX = "text_encoders.qwen3_4b.transformer."   # Qwen3's tensors in an all-in-one file (ComfyUI's naming)
VAE_PREFIX = "vae."
HEAD = 128                                     # rotary axes 32 + 48 + 48 fill a 128-wide head
# Z-Image-Turbo's scheduler/scheduler_config.json: a fixed shift of 3 (no resolution-dependent shift)
SCHEDULER = {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}
# diffusers' single-file rename (original -> diffusers), read backwards for LoRA files in the original names
_RENAMES = (("x_embedder", "all_x_embedder.2-1"), ("final_layer", "all_final_layer.2-1"))


def strip(shapes: Shapes) -> dict:
    """The transformer's tensors without ComfyUI's prefix (other parts of an all-in-one file left out)."""
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in shapes.items()
            if not k.startswith(("text_encoders.", VAE_PREFIX))}


def _count(shapes, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def transformer_config(shapes: Shapes, path: str = "") -> dict:
    """ZImageTransformer2DModel config from Tongyi-named tensor shapes (prefix stripped)."""
    dim, patch_in = (int(x) for x in shapes["x_embedder.weight"])
    qk_norm = "layers.0.attention.q_norm.weight" in shapes
    head = int(shapes["layers.0.attention.q_norm.weight"][0]) if qk_norm else HEAD
    if head != HEAD or dim % head:
        raise ModelLoadError(f"{os.path.basename(path)}: attention heads {head} wide in a {dim}-wide model; Z-Image "
                             f"uses {HEAD} (its rotary axes are 32 + 48 + 48).", path=path,
                             fix="use a Z-Image / Z-Image-Turbo checkpoint")
    return {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": patch_in // 4, "dim": dim,
            "n_layers": _count(shapes, "layers."), "n_refiner_layers": _count(shapes, "noise_refiner."),
            "n_heads": dim // head, "n_kv_heads": dim // head, "norm_eps": 1e-5, "qk_norm": qk_norm,
            "cap_feat_dim": int(shapes[CAP][1]), "rope_theta": 256.0, "t_scale": 1000.0,
            "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512]}   # as Z-Image-Turbo's transformer config


@dataclass(frozen=True)
class ZImageFamily(Family):
    """Z-Image: ComfyUI's split files (or an all-in-one) and diffusers folders."""

    def ldm_score(self, shapes: Shapes) -> int:
        dit = strip(shapes)
        return 20 if KEY in dit and CAP in dit else 0

    def folder_score(self, index: dict, configs: dict[str, dict]) -> int:
        return 20 if configs.get("transformer", {}).get("_class_name") == "ZImageTransformer2DModel" else 0

    # ---- generation ------------------------------------------------------------------------------------------
    def accepts_channels(self, in_channels: int) -> bool:
        return in_channels == self.latent_channels

    def pipeline_mode(self, mode: str, in_channels: int) -> str:
        return mode

    def guidance_kwargs(self, request, components) -> dict:
        """diffusers' Z-Image guidance is ``pos + s * (pos - neg)``, A1111's CFG scale is ``s + 1``: CFG 1 is
        the Turbo model's guidance 0 (no negative pass)."""
        return {"guidance_scale": max(0.0, float(request.cfg_scale) - 1.0)}

    def make_scheduler(self, sampler: str, schedule: str, components):
        from ..samplers import make_flow_scheduler
        return make_flow_scheduler(sampler, schedule, components.scheduler_config)

    def text_kwargs(self, kwargs: dict) -> dict:
        """The pipelines take one [tokens, width] tensor per prompt (each at its own length), no pooled text."""
        return {"prompt_embeds": [kwargs["prompt_embeds"][0]],
                "negative_prompt_embeds": [kwargs["negative_prompt_embeds"][0]]}

    def make_pipeline(self, mode: str, modules, *, controlnet=None):
        pipe = super().make_pipeline(mode, modules, controlnet=controlnet)
        if pipe.vae is not None:
            _take_latents(pipe)
        return pipe

    def encode_text(self, components, text: str):
        """(sequence [1, tokens, width], None) for one text, by diffusers' own Z-Image encoding (chat template,
        Qwen3's penultimate layer, padding dropped). A1111 emphasis is not applied."""
        from diffusers import ZImagePipeline
        pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=components.text_encoder,
                              tokenizer=components.tokenizer, transformer=None)
        embeds, _ = pipe.encode_prompt(text, device=components.text_encoder.device,
                                       do_classifier_free_guidance=False)
        return embeds[0][None], None

    def merges(self, key: str) -> bool:
        """Every tensor (Tongyi's names have no "model" in them)."""
        return True

    def lora_layer_names(self, denoiser) -> dict:
        """Tongyi's names (``layers_0_attention_qkv``, ``x_embedder``...): the fused q / k / v is a
        ``FusedLayer`` over diffusers' separate modules, split by rows."""
        from ..adapters.keys import FusedLayer
        modules = dict(denoiser.named_modules())
        out = {}
        for name, mod in modules.items():
            original = name
            for ours, theirs in _RENAMES:
                original = original.replace(theirs, ours)
            if name.endswith(".attention.to_q"):
                base = name[:-len(".to_q")]
                q, k, v = (modules[f"{base}.to_{p}"] for p in "qkv")
                n = q.weight.shape[0]
                out[(base + ".qkv").replace(".", "_")] = FusedLayer([(q, 0, n), (k, n, 2 * n), (v, 2 * n, 3 * n)])
            elif name.endswith(".attention.to_out.0"):
                out[name[:-len(".to_out.0")].replace(".", "_") + "_out"] = mod
            elif original != name and hasattr(mod, "weight"):
                out[original.replace(".", "_")] = mod
        return out

    # ---- loading ---------------------------------------------------------------------------------------------
    def load_single_file(self, path: str, sd: dict, shapes: Shapes, *, dtype, device, prediction: str | None,
                         sidecar: dict, notes: list[str], companions=None):
        from diffusers import ZImageTransformer2DModel
        from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

        from ..loading.components import Components
        from ..loading.ldm_config import shapes_of, vae_config
        from ..loading.qwen3 import load_qwen3
        from ..loading.single_file import build_module, load_vae
        from ..loading.tokenizers import load_qwen3_tokenizer

        dit = strip(sd)
        cfg = transformer_config(shapes_of(dit), path)
        if companions is not None and self._missing(shapes):
            sd = self._add_companions(sd, shapes, cfg["cap_feat_dim"], companions, notes)
            shapes = shapes_of(sd)
        missing = self._missing(shapes)
        if missing:
            raise ModelLoadError(
                f"{os.path.basename(path)} holds the Z-Image transformer only; "
                f"{' and '.join(w.format(width=cfg['cap_feat_dim']) for w, _ in missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not in it, and no separate file of it was found.", path=path,
                fix="put " + " and ".join(f for _, f in missing) + ", or use a diffusers Z-Image folder")
        kw = dict(path=path, dtype=dtype, device=device)
        state = convert_z_image_transformer_checkpoint_to_diffusers(dict(dit))
        transformer = build_module(lambda: ZImageTransformer2DModel.from_config(cfg), state,
                                   what="Z-Image transformer", config=cfg, **kw)
        notes.append(f"Z-Image S3-DiT: {cfg['n_layers']} blocks + {cfg['n_refiner_layers']} refiner blocks, "
                     f"{cfg['n_heads']} heads, text width {cfg['cap_feat_dim']}")
        te = load_qwen3(sd, TE_PREFIX, **kw)
        vae = load_vae(sd, vae_config(shapes, self, VAE_PREFIX), prefix=VAE_PREFIX, **kw)
        return Components(family=self.name, unet=transformer, vae=vae, text_encoder=te,
                          tokenizer=load_qwen3_tokenizer(), scheduler_config=dict(SCHEDULER), prediction_type="flow",
                          in_channels=cfg["in_channels"], source=path, notes=notes)

    @staticmethod
    def _missing(shapes: Shapes) -> list[tuple[str, str]]:
        """(part, where users keep it) for each part a transformer-only file lacks."""
        parts = (("the Qwen3 text encoder ({width} wide)", TE_PREFIX,
                  "qwen_3_4b.safetensors in models/text_encoder (or ComfyUI's models/text_encoders)"),
                 ("the VAE", VAE_PREFIX + "decoder.", "the FLUX VAE ae.safetensors in models/VAE"))
        return [(what, where) for what, prefix, where in parts if not any(k.startswith(prefix) for k in shapes)]

    @staticmethod
    def _add_companions(sd: dict, shapes: Shapes, width: int, found, notes: list[str]) -> dict:
        """The missing parts from separate files, the text encoder chosen by the width the transformer reads."""
        from ..loading import companions
        return companions.fill(sd, shapes, found, (("qwen3", TE_PREFIX, width, ("qwen",)),
                                                   ("vae16", VAE_PREFIX, 0, ("ae", "flux"))), notes)

    def load_folder(self, path: str, index: dict, configs: dict[str, dict], *, dtype, device, notes: list[str]):
        from diffusers import AutoencoderKL, ZImageTransformer2DModel
        from transformers import Qwen3Model

        from ..loading.components import Components
        from ..loading.diffusers_folder import from_pretrained, read_json
        from ..loading.tokenizers import load_qwen3_tokenizer

        if "text_encoder" not in configs:
            raise ModelLoadError(f"{path} has no text_encoder/ subfolder (Z-Image needs Qwen3-4B).", path=path,
                                 fix="copy the whole diffusers folder")
        transformer = from_pretrained(ZImageTransformer2DModel.from_pretrained, path, "transformer", torch_dtype=dtype)
        vae = from_pretrained(AutoencoderKL.from_pretrained, path, "vae", torch_dtype=dtype)
        te = from_pretrained(Qwen3Model.from_pretrained, path, "text_encoder", dtype=dtype)
        tok_dir = os.path.join(path, "tokenizer")
        if os.path.isdir(tok_dir):       # the folder's own tokenizer wins
            tok = load_qwen3_tokenizer(tok_dir)
        else:
            notes.append("tokenizer: not in the folder, using the shipped Qwen3 tokenizer")
            tok = load_qwen3_tokenizer()
        sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
        sched = read_json(sched_path) if os.path.isfile(sched_path) else dict(SCHEDULER)
        return Components(family=self.name, unet=transformer.to(device).eval(), vae=vae.to(device).eval(),
                          text_encoder=te.to(device).eval(), tokenizer=tok,
                          scheduler_config={k: v for k, v in sched.items() if not k.startswith("_")},
                          prediction_type="flow", in_channels=transformer.config.in_channels, source=path,
                          notes=notes)


def _take_latents(pipe) -> None:
    """Let diffusers' Z-Image pipelines take encoded latents as their image, as the studio hands them: their image
    processor is built for 4 latent channels (so it would treat 16-channel latents as pixels), and the inpaint
    pipeline VAE-encodes its image again for masked-image latents that a 16-channel transformer never reads."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    channels = pipe.vae.config.latent_channels
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2, vae_latent_channels=channels)
    if not hasattr(pipe, "prepare_mask_latents"):
        return
    encode_again = pipe.prepare_mask_latents

    def prepare_mask_latents(mask, masked_image, batch_size, height, width, dtype, device, generator):
        if masked_image.shape[1] != channels:
            return encode_again(mask, masked_image, batch_size, height, width, dtype, device, generator)
        size = (2 * (int(height) // (pipe.vae_scale_factor * 2)), 2 * (int(width) // (pipe.vae_scale_factor * 2)))
        mask = torch.nn.functional.interpolate(mask, size=size, mode="nearest").to(device=device, dtype=dtype)
        latents = masked_image.to(device=device, dtype=dtype)
        return (mask.repeat(batch_size // mask.shape[0], 1, 1, 1),
                latents.repeat(batch_size // latents.shape[0], 1, 1, 1))

    pipe.prepare_mask_latents = prepare_mask_latents


FAMILY = ZImageFamily(
    name="zimage", label="Z-Image", short="ZIMG",
    # kind "qwen3": a causal LM read at its penultimate layer, not a CLIP; no textual-inversion parts
    text_encoders=(TextEncoder("text_encoder", "te1", TE_PREFIX, "qwen3", "<|endoftext|>", "lora_te_"),),
    vae_scale=0.3611, vae_shift=0.1159, latent_channels=16,     # FLUX's VAE, so FLUX's latent space
    latent_rgb=FLUX_LATENT_RGB, latent_rgb_bias=FLUX_LATENT_RGB_BIAS,
    kohya_version="zimage", modelspec_arch="z-image", default_size=1024, real_text_widths=(2560,),
    controlnet=False, trains_embeddings=False, trains_lora=False, embeddings=False, denoiser="transformer",
    prompt_style="diffusers", ragged_text=True,
    size_multiple=16,                                           # 8x VAE, then 2x2 patches
    pipelines={"txt2img": "ZImagePipeline", "img2img": "ZImageImg2ImgPipeline", "inpaint": "ZImageInpaintPipeline"},
    aliases=("z_image", "z-image", "zimage", "z-image-turbo"),
    # Z-Image-Turbo's model card: 9 steps at guidance 0 (A1111's CFG 1), the pipeline's Euler on its own sigmas
    defaults={"steps": 9, "cfg_scale": 1.0, "sampler_name": "Euler", "scheduler": "Simple"},
    lora_tops=("layers", "noise_refiner", "context_refiner", "cap_embedder", "t_embedder", "x_embedder",
               "final_layer", "all_x_embedder", "all_final_layer"),
)
