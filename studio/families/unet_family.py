"""The Stable Diffusion UNet families (SD 1.x, 2.x, XL and its refiner): one class, configured per family.

They share the LDM single-file layout (``model.diffusion_model.`` + ``first_stage_model.`` + text encoders),
diffusers' UNet2DConditionModel / AutoencoderKL and the DDPM schedule; they differ in their text encoders,
the UNet's added conditioning and the names files give them, which are the data fields of ``Family``.

Detection: the text-encoder LAYOUT first (which prefixes hold token embeddings), confirmed by the UNet's
cross-attention width, which must equal the encoders' widths added up. That works for real models
(768 / 1024 / 2048 / 1280) and for tiny test models whose widths are none of those. A UNet-only file falls back
to the released models' width.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ModelLoadError
from ..loading.ldm_config import UNET, cross_width
from .base import Family, Shapes, TextEncoder

FOLDER_ENCODERS = ("text_encoder", "text_encoder_2")


def token_embedding_key(te: TextEncoder) -> str:
    return te.ldm_prefix + ("embeddings.token_embedding.weight" if te.kind == "clip" else "token_embedding.weight")


@dataclass(frozen=True)
class UNetFamily(Family):
    """A Stable Diffusion family with a UNet2DConditionModel."""

    # ---- detection ---------------------------------------------------------------------------------------------
    def ldm_score(self, shapes: Shapes) -> int:
        if UNET + "input_blocks.0.0.weight" not in shapes:
            return 0
        present = [token_embedding_key(te) in shapes for te in self.text_encoders]
        if all(present):
            return 10 + len(present)
        if not any(k.startswith(("cond_stage_model.", "conditioner.")) for k in shapes):
            return 1 if cross_width(shapes) == self.real_cross_width else 0  # a UNet-only file
        return 0

    def controlnet_score(self, config) -> int:
        """Real widths decide (768 / 1024 / 2048); tiny test models fall back to the layout (pooled
        conditioning, linear projections)."""
        if not self.controlnet or (config.get("addition_embed_type") == "text_time") != self.pooled:
            return 0
        if int(config.get("cross_attention_dim") or 0) == self.real_cross_width:
            return 3
        return 1 if self.pooled or bool(config.get("use_linear_projection")) == self.linear_projection else 0

    def check_ldm(self, shapes: Shapes, path: str) -> None:
        """The UNet must read text features as wide as the encoders give (else: a bad merge)."""
        width = cross_width(shapes)
        if width is None:
            raise ModelLoadError(f"{path}: the UNet has no cross-attention layers; not an SD 1/2/XL model.",
                                 path=path, fix="use an SD 1.x / 2.x / SDXL checkpoint.")
        keys = [token_embedding_key(te) for te in self.text_encoders]
        if not all(k in shapes for k in keys):
            return  # UNet-only: the width itself chose the family
        expect = sum(int(shapes[k][1]) for k in keys)
        if width != expect:
            raise ModelLoadError(f"{path}: the UNet expects text features of width {width} but the {self.label} "
                                 f"text encoder gives {expect}; the file is inconsistent (a bad merge?).",
                                 path=path, fix="re-download or re-merge the checkpoint.")

    def why_not(self, shapes: Shapes, path: str) -> ModelLoadError | None:
        """Why an SD-layout file fits no family (None: it is not SD-layout)."""
        if UNET + "input_blocks.0.0.weight" not in shapes:
            return None
        if cross_width(shapes) is None:
            return ModelLoadError(f"{path}: the UNet has no cross-attention layers; not an SD 1/2/XL model.",
                                  path=path, fix="use an SD 1.x / 2.x / SDXL checkpoint.")
        return ModelLoadError(f"{path}: no text encoder and an unknown cross-attention width "
                              f"{cross_width(shapes)}.", path=path,
                              fix="use a complete checkpoint (UNet, VAE and text encoder).")

    def folder_score(self, index: dict, configs: dict[str, dict]) -> int:
        if "unet" not in configs:
            return 0
        present = {a for a in FOLDER_ENCODERS if a in configs}
        width = configs["unet"].get("cross_attention_dim")
        if not present:
            return 1 if width == self.real_cross_width else 0
        if present != {te.attr for te in self.text_encoders}:
            return 0
        # OpenCLIP encoders use gelu, CLIP-L quick_gelu: that tells SD2 from SD1
        acts = {"clip": "quick_gelu", "open_clip": "gelu"}
        if any(configs[te.attr].get("hidden_act", acts[te.kind]) != acts[te.kind] for te in self.text_encoders):
            return 0
        return 10 + len(present)

    def check_folder(self, configs: dict[str, dict], path: str) -> None:
        width = configs["unet"].get("cross_attention_dim")
        widths = [configs[te.attr].get("hidden_size") for te in self.text_encoders if te.attr in configs]
        if widths and None not in widths and sum(widths) != width:
            raise ModelLoadError(f"{path}: the text encoder width {'+'.join(map(str, widths))} does not match the "
                                 f"UNet's cross-attention width {width}.", path=path,
                                 fix="the folder mixes parts of different models; copy it again.")

    def folder_why_not(self, configs: dict[str, dict], path: str) -> ModelLoadError | None:
        if "unet" not in configs:
            return None
        return ModelLoadError(f"{path}: no text encoder and unknown cross-attention width "
                              f"{configs['unet'].get('cross_attention_dim')}.", path=path,
                              fix="use a complete diffusers folder.")

    # ---- adapters ----------------------------------------------------------------------------------------------
    def lora_layer_names(self, denoiser) -> dict:
        """The LDM names of the UNet's modules (``input_blocks_4_1_...``), as SDXL kohya files write them."""
        import torch

        from ..loading.ldm_export import UNET_RESNET, UNET_TOP, _map_key, _unet_prefix_map
        prefixes = {**UNET_TOP, **_unet_prefix_map(denoiser.config)}
        out = {}
        for name, mod in denoiser.named_modules():
            if not isinstance(getattr(mod, "weight", None), torch.nn.Parameter):
                continue
            try:
                out[_map_key(name + ".", prefixes, UNET_RESNET)[:-1].replace(".", "_")] = mod
            except KeyError:
                pass  # modules with no LDM name (none in practice) keep their diffusers name only
        return out

    # ---- loading -----------------------------------------------------------------------------------------------
    def scheduler_config(self, prediction: str = "epsilon") -> dict:
        from ..loading.ldm_config import scheduler_config
        return scheduler_config(prediction)

    def load_single_file(self, path: str, sd: dict, shapes: Shapes, *, dtype, device, prediction: str | None,
                         sidecar: dict, notes: list[str], companions=None):
        from ..loading.components import Components
        from ..loading.ldm_config import unet_config, vae_config, vae_prefix
        from ..loading.single_file import load_clip, load_open_clip, load_unet, load_vae, prediction_type
        from ..loading.tokenizers import load_clip_tokenizer

        prediction = prediction_type(prediction, sidecar, notes)
        kw = dict(path=path, dtype=dtype, device=device)
        parts: dict = {}
        proj_dim = None
        for te in self.text_encoders:
            if te.kind == "clip":
                model = load_clip(sd, te.ldm_prefix, **kw)
            else:
                model = load_open_clip(sd, te.ldm_prefix, with_projection=te.with_projection,
                                       drop_last=te.drop_last, **kw)
                if te.drop_last:
                    notes.append(f"{self.label} text encoder: last OpenCLIP block dropped (penultimate-layer "
                                 "conditioning)")
            if te.with_projection:
                proj_dim = model.config.projection_dim
            parts[te.attr] = model
            parts[te.attr.replace("text_encoder", "tokenizer")] = load_clip_tokenizer(te.pad_token)
        ucfg = unet_config(shapes, self, sidecar=sidecar, text_proj_dim=proj_dim, prediction=prediction)
        unet = load_unet(sd, ucfg, **kw)
        pre = vae_prefix(shapes)
        vae = load_vae(sd, vae_config(shapes, self, pre), prefix=pre, **kw)
        in_ch = ucfg["in_channels"]
        if in_ch != 4:
            notes.append({9: "inpainting model (9 input channels)", 8: "instruct-pix2pix model (8 input channels)",
                          5: "depth model (5 input channels)"}.get(in_ch, f"{in_ch} input channels"))
        parts.setdefault("text_encoder", None)
        parts.setdefault("tokenizer", None)
        return Components(family=self.name, unet=unet, vae=vae, scheduler_config=self.scheduler_config(prediction),
                          prediction_type=prediction, in_channels=in_ch, source=path, notes=notes, **parts)

    def load_folder(self, path: str, index: dict, configs: dict[str, dict], *, dtype, device, notes: list[str]):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from ..loading.components import Components
        from ..loading.diffusers_folder import from_pretrained, read_json, tokenizer_of

        unet = from_pretrained(UNet2DConditionModel.from_pretrained, path, "unet", torch_dtype=dtype)
        vae = from_pretrained(AutoencoderKL.from_pretrained, path, "vae", torch_dtype=dtype)
        parts: dict = {"text_encoder": None, "tokenizer": None}
        for te in self.text_encoders:
            cls = CLIPTextModelWithProjection if te.with_projection else CLIPTextModel
            parts[te.attr] = from_pretrained(cls.from_pretrained, path, te.attr, dtype=dtype).to(device).eval()
            tok = te.attr.replace("text_encoder", "tokenizer")
            parts[tok] = tokenizer_of(path, tok, te.pad_token, notes)
        sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
        pred = read_json(sched_path).get("prediction_type", "epsilon") if os.path.isfile(sched_path) else "epsilon"
        notes.append(f"prediction type {pred} (from the scheduler config)")
        return Components(family=self.name, unet=unet.to(device).eval(), vae=vae.to(device).eval(),
                          scheduler_config=self.scheduler_config(pred), prediction_type=pred,
                          in_channels=unet.config.in_channels, source=path, notes=notes, **parts)
