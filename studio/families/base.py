"""What the studio knows about one model family, in one object.

Everything outside ``studio/families/`` asks a ``Family`` (``families.get(name)``) instead of comparing family
names: which text encoders a checkpoint has and where their tensors sit, which diffusers pipeline serves a mode,
how LoRA files name its layers, which metadata trainers write, the latent preview projection, the defaults.
A family module builds one ``Family`` (or a subclass that overrides the loading methods).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import ModelLoadError

Shapes = Mapping[str, Sequence[int]]
MODES = ("txt2img", "img2img", "inpaint")


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family, as files and LoRAs name it."""

    attr: str                      # Components / pipeline attribute: "text_encoder", "text_encoder_2"
    lora_id: str                   # component id in LoRA files: "te1", "te2"
    ldm_prefix: str                # its tensors in a single-file checkpoint
    kind: str                      # "clip" (HF-named CLIP tensors) or "open_clip" (OpenCLIP tensors)
    pad_token: str                 # CLIP-L pads with <|endoftext|>, OpenCLIP with "!" (id 0)
    kohya_prefix: str              # kohya LoRA key prefix: "lora_te_", "lora_te1_", "lora_te2_"
    embedding_part: str = "single"  # its part in a textual-inversion file: "single", "clip_l", "clip_g"
    with_projection: bool = False  # CLIPTextModelWithProjection (gives the pooled text embedding)
    drop_last: bool = False        # conditions on the penultimate block, so diffusers' model ends there
    tokenizer_folder: str = "tokenizer"   # its tokenizer's subfolder in a diffusers folder


@dataclass(frozen=True)
class Family:
    """A model family. Data fields describe it; methods load it (overridden by families of other layouts)."""

    name: str                                  # stable id, stored in metadata and caches: "sd1", "sdxl", ...
    label: str                                 # in messages: "SD 1.x", "SDXL"
    short: str                                 # on badges: "SD1", "SDXL"
    text_encoders: tuple[TextEncoder, ...]
    vae_scale: float                           # latent scaling factor of its VAE
    latent_rgb: tuple[tuple[float, float, float], ...]   # cheap preview: latent channel -> RGB
    kohya_version: str                         # ss_base_model_version kohya writes
    modelspec_arch: str                        # modelspec.architecture stem
    default_size: int                          # native resolution
    kohya_v2: bool = False                     # kohya's ss_v2 flag (the SD 2.x text encoder)
    vae_shift: float | None = None             # latent shift of its VAE (Flux), None where there is none
    denoiser: str = "unet"                     # the pipelines' name for Components.unet ("transformer" for DiTs)
    latent_channels: int = 4
    latent_rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)   # added after the preview projection
    prompt_style: str = "clip"                 # "clip": A1111's chunked CLIP encoding; "t5": T5 sequence + CLIP pooled
    ragged_text: bool = False                  # each prompt's embeddings keep their own length (never padded)
    embeddings: bool = True                    # takes textual-inversion embeddings
    distilled_guidance: bool = False           # guidance is a model input (Forge's "Distilled CFG Scale")
    size_multiple: int = 8                     # width and height must be multiples of this
    real_cross_width: int | None = None        # cross-attention width of the released models (UNet-only files)
    real_text_widths: tuple[int, ...] = ()     # hidden widths of the released text encoders, in encoder order
    pooled: bool = False                       # UNet takes pooled text + size ids (SDXL "text_time")
    size_ids: int = 6                          # SDXL: sizes + crop + target (6); refiner: + aesthetic score (5)
    aesthetic_score: bool = False              # the refiner's conditioning
    txt2img: bool = True                       # False: only refines an existing picture
    controlnet: bool = True
    trains_embeddings: bool = True             # the trainer can train textual-inversion embeddings for it
    trains_lora: bool = True                   # the trainer can train LoRAs for it
    keeps_fp8: bool = False                    # fp8 weights of a file stay fp8 in memory (cast up as they run)
    kohya_network_module: str = "networks.lora"   # ss_network_module of kohya's LoRAs for it
    fixed_heads: int | None = None             # SD1: 8 heads at every level; else 64-wide heads
    linear_projection: bool = False            # transformer blocks project in/out with Linear, not 1x1 convs
    kohya_unet_ldm_names: bool = False         # kohya names its UNet layers in the LDM layout (SDXL)
    v_prediction_variant: bool = False         # has v-prediction releases (SD2 768-v): "_v" in kohya's version
    v_sample_size: int | None = None           # UNet sample size of the v-prediction releases
    pipelines: Mapping[str, str] = field(default_factory=dict)             # mode -> diffusers class name
    controlnet_pipelines: Mapping[str, str] = field(default_factory=dict)  # mode -> diffusers class name
    aliases: tuple[str, ...] = ()              # other spellings in metadata ("sd_v1", "stable-diffusion-v1")
    lora_tops: tuple[str, ...] = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks",
                                  "middle_block", "conv_in", "conv_out", "time_embedding")   # denoiser top modules
    # what the UI sets on choosing a checkpoint of this family (as Forge's presets): steps, cfg_scale,
    # distilled_cfg_scale, sampler_name, scheduler; width / height come from default_size
    defaults: Mapping[str, Any] = field(default_factory=dict)

    # ---- what other code asks --------------------------------------------------------------------------------
    def encoder(self, attr: str) -> TextEncoder | None:
        return next((t for t in self.text_encoders if t.attr == attr), None)

    def encoder_by_lora_id(self, lora_id: str) -> TextEncoder | None:
        return next((t for t in self.text_encoders if t.lora_id == lora_id), None)

    def pipeline_class(self, mode: str, *, controlnet: bool = False) -> str:
        table = self.controlnet_pipelines if controlnet else self.pipelines
        return table[mode]

    def make_pipeline(self, mode: str, modules: Mapping[str, Any], *, controlnet: Any = None) -> Any:
        """A diffusers pipeline for ``mode`` over ``modules`` (vae, unet, text encoders, tokenizers, scheduler:
        the SAME objects, nothing copied); with ``controlnet`` the ControlNet pipeline. Parts the class does
        not take are left out; its optional ones (safety checker, image encoder) are switched off."""
        import inspect

        import diffusers
        cls = getattr(diffusers, self.pipeline_class(mode, controlnet=controlnet is not None))
        accepted = inspect.signature(cls.__init__).parameters
        if "unet" in modules and self.denoiser != "unet":
            modules = {**{k: v for k, v in modules.items() if k != "unet"}, self.denoiser: modules["unet"]}
        kwargs = {k: v for k, v in modules.items() if k in accepted and k != "controlnet"}
        for name, value in (("safety_checker", None), ("feature_extractor", None), ("image_encoder", None),
                            ("requires_safety_checker", False), ("requires_aesthetics_score", self.aesthetic_score)):
            if name in accepted:
                kwargs.setdefault(name, value)
        if controlnet is not None:
            kwargs["controlnet"] = controlnet
        pipe = cls(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generation_defaults(self, components: Any = None, shapes: Shapes | None = None) -> dict:
        """The UI's values for a checkpoint of this family. A variant may change them (FLUX schnell's 4 steps):
        told by ``components`` (the loaded model) or, before loading, by ``shapes`` (its file header's)."""
        return {"steps": 20, "cfg_scale": 7.0, "sampler_name": "DPM++ 2M", "scheduler": "Automatic",
                "width": self.default_size, "height": self.default_size, **self.defaults}

    # ---- what a generation asks ----------------------------------------------------------------------------
    def accepts_channels(self, in_channels: int) -> bool:
        """Whether the studio can drive a denoiser with this many input channels (SD: 4, inpainting 9)."""
        return in_channels in (self.latent_channels, 2 * self.latent_channels + 1)

    def pipeline_mode(self, mode: str, in_channels: int) -> str:
        """The pipelines key serving ``mode`` for this denoiser: an inpainting model serves every mode."""
        return "inpaint" if in_channels == 2 * self.latent_channels + 1 else mode

    def is_inpaint_model(self, in_channels: int) -> bool:
        return self.pipeline_mode("txt2img", in_channels) != "txt2img"

    def inpaint_from_pixels(self, in_channels: int) -> bool:
        """Whether this inpainting model's pipeline masks and encodes the picture itself (it takes the image and
        mask as pixels and no latents of ours); SD's 9-channel pipelines take our latents."""
        return False

    def guidance_kwargs(self, request: Any, components: Any) -> dict:
        """Pipeline guidance arguments for a request (classifier-free guidance at ``cfg_scale``)."""
        return {"guidance_scale": request.cfg_scale}

    def make_scheduler(self, sampler: str, schedule: str, components: Any) -> tuple[Any, list[str]]:
        """The diffusers scheduler for an A1111 sampler + schedule type, and warnings."""
        from ..samplers import make_scheduler
        return make_scheduler(sampler, schedule, components.scheduler_config)

    def pack_latents(self, latents: Any) -> Any:
        """Latents [B, C, h, w] as the pipeline takes them (unchanged for a UNet)."""
        return latents

    def unpack_latents(self, latents: Any, height: int, width: int) -> Any:
        """What the pipeline returns (or hands a step callback) -> latents [B, C, h, w]."""
        return latents

    def encode_text(self, components: Any, text: str) -> tuple[Any, Any]:
        """(sequence embeddings, pooled) for one prompt text, for families whose ``prompt_style`` is
        "diffusers" (the pipeline's own encoding; A1111 emphasis is not applied)."""
        raise ModelLoadError(f"{self.label} models have no prompt encoder in this studio.",
                             fix="use a model of another family")

    # ---- training ------------------------------------------------------------------------------------------
    def lora_train_targets(self, denoiser: Any, which: str) -> list[str] | None:
        """The denoiser modules a LoRA run trains (None: the SD UNet rule of ``training.networks``)."""
        return None

    def kohya_lora_layers(self, layers: Mapping[str, dict], denoiser: Any) -> dict[str, dict] | None:
        """Trained denoiser layers (diffusers module -> kohya tensors) as kohya's files name them, for families
        whose file layers are not one per module (None: one per module, named by ``training.export``)."""
        return None

    def training_condition(self, components: Any, captions: list[str], modules: Mapping[str, Any]) -> dict:
        """The denoiser's text inputs for a training batch (flow families; the UNet ones use
        ``training.losses.encode_text``)."""
        raise ModelLoadError(f"LoRA training for {self.label} is not supported yet.",
                             fix="train on a model of another family")

    def flow_prediction(self, denoiser: Any, noisy: Any, sigmas: Any, cond: dict, guidance: float) -> Any:
        """A flow-matching denoiser's velocity for latents [B, C, h, w] at flow times ``sigmas``."""
        raise ModelLoadError(f"LoRA training for {self.label} is not supported yet.",
                             fix="train on a model of another family")

    def text_kwargs(self, kwargs: dict) -> dict:
        """``Conditioning.kwargs()`` (prompt / negative / pooled embeddings) as this family's pipelines take them."""
        return kwargs

    # ---- merging -------------------------------------------------------------------------------------------
    def merges(self, key: str) -> bool:
        """Whether a checkpoint merge interpolates this tensor (else model A's is kept): A1111's rule, every
        key with "model" in its name (the UNet, text encoders and VAE of the LDM layout)."""
        return "model" in key

    # ---- adapters ------------------------------------------------------------------------------------------
    def lora_layer_names(self, denoiser: Any) -> dict[str, Any]:
        """Other names LoRA files give the denoiser's modules (underscored) -> the module, or a ``FusedLayer``
        for a file layer that is several modules here. Diffusers' own names are always known."""
        return {}

    def unet_sample_size(self, prediction: str = "epsilon") -> int:
        if prediction == "v_prediction" and self.v_sample_size:
            return self.v_sample_size
        return self.default_size // 8

    def kohya_base_version(self, prediction: str = "epsilon") -> str:
        return self.kohya_version + ("_v" if prediction == "v_prediction" and self.v_prediction_variant else "")

    def kohya_te_prefix(self, attr_or_id: str) -> str:
        """kohya's key prefix for a text encoder, by attribute ("text_encoder") or LoRA id ("te1")."""
        te = self.encoder(attr_or_id) or self.encoder_by_lora_id(attr_or_id)
        if te is None:
            raise KeyError(f"{self.label} has no text encoder {attr_or_id!r}")
        return te.kohya_prefix

    def matches_version(self, text: str) -> bool:
        """Whether a metadata value (kohya version, modelspec architecture) names this family."""
        text = text.lower()
        return any(text.startswith(a) for a in (self.kohya_version, self.modelspec_arch, *self.aliases))

    def attention_heads(self, channels: Sequence[int]) -> int | list[int]:
        """diffusers' ``attention_head_dim`` for these level widths (the family's head rule)."""
        return self.fixed_heads or [max(1, int(c) // 64) for c in channels]

    # ---- detection and loading (a family of another layout overrides these) ---------------------------------
    def ldm_score(self, shapes: Shapes) -> int:
        """How surely a single-file checkpoint with these tensors is of this family (0: not at all)."""
        return 0

    def folder_score(self, index: dict, configs: dict[str, dict]) -> int:
        """The same for a diffusers folder (``model_index.json`` and the subfolders' configs)."""
        return 0

    def lora_score(self, encoders: set[str], cross_width: int | None, text_widths: Mapping[str, int],
                   unet_layers: frozenset[str] = frozenset()) -> int:
        """How surely a LoRA is for this family: ``encoders`` the text-encoder ids it has layers for ("te1",
        "te2"), ``cross_width`` its UNet cross-attention input width, ``text_widths`` id -> hidden width,
        ``unet_layers`` the first parts of its denoiser layer names ("down_blocks", "double_blocks"...)."""
        if unet_layers and not unet_layers <= set(self.lora_tops):   # a top module this family lacks
            return 0
        own = [te.lora_id for te in self.text_encoders]
        if not encoders <= set(own):
            return 0
        real = dict(zip(own, self.real_text_widths))
        score = 3 if cross_width is not None and cross_width == self.real_cross_width else 0
        if unet_layers:
            score += 3          # the denoiser's layout (shared by the SD UNet families: it tells them apart
            # from DiTs, not from each other)
        if text_widths and all(real.get(k) == w for k, w in text_widths.items()):
            score += 1
        if encoders and encoders == set(own):
            score += 2
        return score

    def embedding_score(self, parts: Mapping[str, int]) -> int:
        """How surely a textual-inversion file with ``parts`` (part name -> vector width) is for this family."""
        own = {te.embedding_part: w for te, w in zip(self.text_encoders, self.real_text_widths)}
        if set(parts) != set(own):
            return 0
        if all(own[k] == w for k, w in parts.items()):
            return 2
        return 1 if len(parts) > 1 else 0   # named parts (clip_l / clip_g) tell the family at any width

    def controlnet_score(self, config: Mapping) -> int:
        """How surely a ControlNet with this diffusers config is made for this family (0: not at all)."""
        return 0

    def check_ldm(self, shapes: Shapes, path: str) -> None:
        """Raise ModelLoadError when a file detected as this family is inconsistent (nothing to check here)."""

    def why_not(self, shapes: Shapes, path: str) -> ModelLoadError | None:
        """When no family claims a file: this family's explanation if the file is of its layout, else None."""
        return None

    def check_folder(self, configs: dict[str, dict], path: str) -> None:
        """As ``check_ldm``, for a diffusers folder."""

    def folder_why_not(self, configs: dict[str, dict], path: str) -> ModelLoadError | None:
        return None

    def load_single_file(self, path: str, sd: dict, shapes: Shapes, **kw) -> Any:
        raise ModelLoadError(f"{self.label} checkpoints cannot be read from a single file by this studio.",
                             path=path, fix=f"load the {self.label} model as a diffusers folder")

    def load_folder(self, path: str, index: dict, configs: dict[str, dict], **kw) -> Any:
        raise ModelLoadError(f"{self.label} diffusers folders cannot be read by this studio.", path=path,
                             fix=f"load the {self.label} model as a single-file checkpoint")

    def __str__(self) -> str:
        return self.name
