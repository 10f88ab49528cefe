"""Device, dtype and memory-budget decisions, all driven by settings."""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import logging

import psutil

from .errors import StudioError
from .lazy import torch
from .settings import Settings

log = logging.getLogger(__name__)



def _dtypes() -> dict:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

GiB = 1024**3


def resolve_device(settings: Settings) -> torch.device:
    """The compute device: the setting, or the best one present when it is "auto"."""
    name = settings.device
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StudioError(f"Device {name!r} was asked for but CUDA is not available here.", field="device",
                          fix="use --device cpu (or auto), or install a CUDA build of torch")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise StudioError("Device 'mps' was asked for but is not available here.", field="device",
                          fix="use --device cpu (or auto)")
    return torch.device(name)


def resolve_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    """fp16 on GPUs, fp32 on the CPU (half precision on CPU is slow and lossy) unless set explicitly."""
    if settings.precision == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return _dtypes()[settings.precision]


def vae_dtype(settings: Settings, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if settings.no_half_vae else dtype


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _dtypes().items()}.get(dtype, str(dtype))


def ram_budget(settings: Settings) -> int:
    """Bytes for models parked in RAM: the setting, else half the system RAM minus 2 GiB, at least 4 GiB."""
    if settings.ram_budget_mb > 0:
        return settings.ram_budget_mb * 1024**2
    total = psutil.virtual_memory().total
    return max(4 * GiB, total // 2 - 2 * GiB)


def vram_reserve(total: int) -> int:
    """VRAM kept free for a job's activations (SDXL at 1024² needs a few GiB): a quarter of a small card, 3 GiB
    from a 12 GiB card up, never below 1 GiB."""
    return max(GiB, min(3 * GiB, total // 4))


def device_budget(settings: Settings, device: torch.device) -> int:
    """Bytes for models resident on the device. On the CPU the device tier is RAM itself.

    CUDA: what this process can have (the free memory plus what torch's allocator already holds for us, the
    cached models included, which free memory no longer shows) minus the working reserve."""
    if settings.vram_budget_mb > 0:
        return settings.vram_budget_mb * 1024**2
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        ours = torch.cuda.memory_reserved(device)
        return max(GiB, min(total, free + ours) - vram_reserve(total))
    return ram_budget(settings)


def xformers_usable(settings: Settings, device: torch.device) -> bool:
    return settings.xformers and device.type == "cuda" and importlib.util.find_spec("xformers") is not None


def release_memory(device: torch.device | None = None) -> None:
    """Give freed tensors back: Python GC, the CUDA cache, and glibc's heap (else RSS stays high after evictions)."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass
