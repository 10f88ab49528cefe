"""One typed settings object: CLI flags override the settings file, which overrides these defaults.

It is passed to the parts that need it (never imported as a global).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import StudioError

DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OFFLOAD_MODES = ("none", "medvram", "lowvram")
QUANTIZE_MODES = ("none", "int8", "fp8")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")   # scaled_dot_product_attention kernels


@dataclass
class Settings:
    """Everything the studio can be told. Paths left empty are derived from ``models_dir`` / ``data_dir``."""

    # folders (A1111 names)
    models_dir: str = "models"
    ckpt_dir: str = ""
    vae_dir: str = ""
    lora_dir: str = ""
    lycoris_dir: str = ""
    embeddings_dir: str = ""
    controlnet_dir: str = ""
    text_encoder_dir: str = ""        # text-encoder files kept apart (clip_l, t5xxl: Forge's models/text_encoder)
    annotators_dir: str = ""
    data_dir: str = "data"
    outdir: str = "outputs"
    # device and memory
    device: str = "auto"
    precision: str = "auto"
    no_half_vae: bool = False
    offload: str = "none"
    xformers: bool = False
    vram_budget_mb: int = 0          # 0: derived from free device memory
    ram_budget_mb: int = 0           # 0: derived from system RAM (InvokeAI's rule)
    rng: str = "cpu"                 # where initial noise is drawn: "cpu" (same everywhere) or "device"
    allow_tf32: bool = True          # TF32 for fp32 matmuls / convolutions on Ampere+ (A1111 turns it on too)
    cudnn_benchmark: bool = False    # autotune convolutions (each new image size pays a search; on for GTX 16xx)
    pin_memory: bool = True          # models parked in RAM sit in page-locked memory: faster RAM <-> VRAM moves
    annotator_device: str = "auto"   # ControlNet preprocessor models: "auto" (the compute device) or "cpu"
    quantize: str = "none"           # weights kept quantised: "int8" (weight-only, any device), "fp8" (CUDA storage)
    # speed
    deepcache_interval: int = 1      # DeepCache: the whole UNet every N-th step, its outer ring between (1: off)
    deepcache_start: float = 0.4     # the share of a pass's first steps run whole before (the layout forms there)
    channels_last: bool = False      # UNets in channels_last memory format (NHWC convolutions: faster on tensor cores)
    fused_qkv: bool = False          # one matmul for attention's q / k / v (diffusers' fuse_qkv_projections)
    sdpa_backend: str = "auto"       # scaled_dot_product_attention kernel: auto, flash, efficient, cudnn, math
    compile_backend: str = ""        # torch.compile the denoiser with this backend ("" off; "inductor" is torch's)
    vae_tiling: bool = False         # the VAE decodes / encodes large images in tiles (a fixed amount of memory)
    queue_batch: int = 1             # dynamic batching: images of compatible waiting txt2img jobs run as one (1: off)
    onnx_runtime: bool = False       # UNet and VAE on onnxruntime from the checkpoint's export (models/onnx)
    # network
    allow_download: bool = False     # Hugging Face repo ids may download into the HF cache
    # generation defaults and limits
    default_checkpoint: str = ""
    default_vae: str = "Automatic"
    # live preview every N steps (0: off); each costs a device->host copy and CPU time (A1111: every 10)
    preview_every: int = 5
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_batch_count: int = 100
    # A1111 has no prompt limit; ours is generous (long real prompts with many LoRA tags stay far below it) but
    # keeps one request from holding the single job queue for minutes. 10000 characters of ordinary prompt text
    # are ~2000-3500 CLIP tokens (27-47 chunks of 75); 64 chunks leave room for that and still stop
    # BREAK-heavy prompts (each BREAK starts a chunk: one text-encoder pass and 77 more cross-attention tokens)
    max_prompt_length: int = 10000
    max_prompt_chunks: int = 64
    save_images: bool = True
    filename_pattern: str = "[seed]"
    lora_cache_mb: int = 1024        # parsed LoRA files kept in RAM
    lora_patch_cache_mb: int = -1    # LoRA-patched weights kept for re-activation (0: off; -1: 1/4 of the RAM budget)
    controlnet_units: int = 3        # ControlNet units shown per tab
    controlnet_save_maps: bool = True   # save each unit's detected map beside the output
    max_image_pixels: int = 4096 * 4096   # larger uploads are refused (also stops decompression bombs)
    # per-model overrides, keyed by checkpoint file name: {"prediction": "v" | "epsilon"}
    model_overrides: dict = field(default_factory=dict)
    # settings added by extensions (studio_settings hook), keyed by their SettingSpec.key
    extension_settings: dict = field(default_factory=dict)
    extensions_dir: str = "extensions"

    # ---- derived paths -------------------------------------------------------------------------
    def _sub(self, explicit: str, name: str) -> Path:
        return Path(explicit) if explicit else Path(self.models_dir) / name

    @property
    def ckpt_path(self) -> Path:
        return self._sub(self.ckpt_dir, "Stable-diffusion")

    @property
    def vae_path(self) -> Path:
        return self._sub(self.vae_dir, "VAE")

    @property
    def lora_path(self) -> Path:
        return self._sub(self.lora_dir, "Lora")

    @property
    def lycoris_path(self) -> Path:
        return self._sub(self.lycoris_dir, "LyCORIS")

    @property
    def embeddings_path(self) -> Path:
        return self._sub(self.embeddings_dir, "embeddings")

    @property
    def controlnet_path(self) -> Path:
        return self._sub(self.controlnet_dir, "ControlNet")

    @property
    def text_encoder_path(self) -> Path:
        return self._sub(self.text_encoder_dir, "text_encoder")

    @property
    def companion_paths(self) -> list[Path]:
        """Where separate text-encoder files are looked for: Forge's ``text_encoder`` and ComfyUI's
        ``text_encoders`` / ``clip`` beside the checkpoints' models folder."""
        paths = [self.text_encoder_path]
        if not self.text_encoder_dir:
            paths += [Path(self.models_dir) / "text_encoders", Path(self.models_dir) / "clip"]
        return paths

    @property
    def onnx_path(self) -> Path:
        """Where ONNX exports of checkpoints go (studio.onnx): one folder per checkpoint."""
        return Path(self.models_dir) / "onnx"

    @property
    def annotators_path(self) -> Path:
        return self._sub(self.annotators_dir, "annotators")

    @property
    def settings_file(self) -> Path:
        return Path(self.data_dir) / "settings.json"

    @property
    def cache_file(self) -> Path:
        return Path(self.data_dir) / "cache.json"

    # ---- checks and persistence ----------------------------------------------------------------
    def validate(self) -> "Settings":
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise StudioError(f"Setting 'device' is {self.device!r}.", field="device",
                              fix=f"use one of {', '.join(DEVICES)} or cuda:N")
        if self.precision not in PRECISIONS:
            raise StudioError(f"Setting 'precision' is {self.precision!r}.", field="precision",
                              fix=f"use one of {', '.join(PRECISIONS)}")
        if self.offload not in OFFLOAD_MODES:
            raise StudioError(f"Setting 'offload' is {self.offload!r}.", field="offload",
                              fix=f"use one of {', '.join(OFFLOAD_MODES)}")
        if self.quantize not in QUANTIZE_MODES:
            raise StudioError(f"Setting 'quantize' is {self.quantize!r}.", field="quantize",
                              fix=f"use one of {', '.join(QUANTIZE_MODES)}")
        if self.annotator_device not in ("auto", "cpu"):
            raise StudioError(f"Setting 'annotator_device' is {self.annotator_device!r}.", field="annotator_device",
                              fix="use 'auto' (the compute device) or 'cpu'")
        if not 1 <= self.deepcache_interval <= 10:
            raise StudioError(f"Setting 'deepcache_interval' is {self.deepcache_interval}.", field="deepcache_interval",
                              fix="use 1 (off) to 10; 2 or 3 keep the picture closest")
        if not 0.0 <= self.deepcache_start < 1.0:
            raise StudioError(f"Setting 'deepcache_start' is {self.deepcache_start}.", field="deepcache_start",
                              fix="use a share of the steps from 0 to below 1 (0.4: the first 40 % run whole)")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise StudioError(f"Setting 'sdpa_backend' is {self.sdpa_backend!r}.", field="sdpa_backend",
                              fix=f"use one of {', '.join(SDPA_BACKENDS)}")
        if self.compile_backend and not self.compile_backend.replace("_", "").isalnum():
            raise StudioError(f"Setting 'compile_backend' is {self.compile_backend!r}.", field="compile_backend",
                              fix="use a torch.compile backend name such as inductor, or leave it empty (off)")
        if not 1 <= self.queue_batch <= 64:
            raise StudioError(f"Setting 'queue_batch' is {self.queue_batch}.", field="queue_batch",
                              fix="use 1 (each job alone) to 64 images per shared batch")
        if self.rng not in ("cpu", "device"):
            raise StudioError(f"Setting 'rng' is {self.rng!r}.", field="rng", fix="use 'cpu' or 'device'")
        return self

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> tuple["Settings", list[str]]:
        """Build from a dict, keeping known keys of the right type; returns (settings, warnings)."""
        known = {f.name: f for f in fields(cls)}
        defaults = cls()
        kwargs, warnings = {}, []
        for key, value in data.items():
            if key not in known:
                warnings.append(f"unknown setting {key!r} ignored")
                continue
            want = type(getattr(defaults, key))
            if want is int and isinstance(value, bool) or not isinstance(value, want):
                if want is int and isinstance(value, float) and value.is_integer():
                    value = int(value)
                elif want is float and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)      # JSON writes 0.0 as 0 from some editors
                else:
                    warnings.append(f"setting {key!r} should be {want.__name__}, got {value!r}; default used")
                    continue
            kwargs[key] = value
        return cls(**kwargs), warnings

    @classmethod
    def load(cls, data_dir: str | os.PathLike, overrides: dict | None = None) -> tuple["Settings", list[str]]:
        """Defaults <- settings file in ``data_dir`` <- ``overrides`` (CLI). An unreadable file is backed up."""
        path = Path(data_dir) / "settings.json"
        data: dict = {}
        messages: list[str] = []
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, dict):
                    raise ValueError("top level is not an object")
            except (ValueError, OSError) as exc:
                backup = path.with_name(f"settings.broken-{time.strftime('%Y%m%d-%H%M%S')}.json")
                shutil.copy2(path, backup)
                messages.append(f"Settings file {path} could not be read ({exc}); it was backed up to "
                                f"{backup} and defaults are used.")
                data = {}
        data = {**data, "data_dir": str(data_dir), **(overrides or {})}
        settings, warnings = cls.from_dict(data)
        return settings.validate(), messages + warnings

    def save(self) -> Path:
        """Write the settings file atomically."""
        path = self.settings_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
        return path
