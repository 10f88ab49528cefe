"""Device, dtype and memory-budget decisions, all driven by settings."""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import logging
import sys
from typing import Any

import psutil

from .errors import StudioError
from .lazy import torch
from .settings import Settings

log = logging.getLogger(__name__)


def _dtypes() -> dict:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

GiB = 1024**3


def resolve_device(settings: Settings) -> torch.device:
    """The compute device: the setting, or the best one present when it is "auto". A CUDA device gets its
    backend flags (TF32, cudnn.benchmark) set here, once per resolution."""
    device = _pick_device(settings)
    if device.type == "cuda":
        configure_backends(settings, device)
    return device


def _pick_device(settings: Settings) -> torch.device:
    name = settings.device
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StudioError(f"Device {name!r} was asked for but CUDA is not available here.", field="device",
                          fix="use --device cpu (or auto), or install a CUDA build of torch "
                              "(python launch.py --reinstall-torch)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise StudioError("Device 'mps' was asked for but is not available here.", field="device",
                          fix="use --device cpu (or auto)")
    return torch.device(name)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def fp16_broken(device: torch.device) -> bool:
    """GTX 16xx cards (Turing TU11x, compute capability 7.5) give black / NaN images in fp16.

    Same test as A1111's ``devices.cuda_no_autocast`` (capability 7.5 and a "GTX 16" name); RTX 20xx cards share
    the capability and are fine, so the name decides.
    """
    if device.type != "cuda":
        return False
    index = _cuda_index(device)
    return tuple(torch.cuda.get_device_capability(index)) == (7, 5) and \
        "GTX 16" in torch.cuda.get_device_name(index).upper()


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 (compute capability 8.0+, Ampere and later). torch's own check counts emulation as support by
    default, which runs, but many times slower than fp16."""
    if device.type != "cuda":
        return True  # CPUs and Apple GPUs compute bf16 (torch raises on the rare op that lacks it)
    index = _cuda_index(device)
    if tuple(torch.cuda.get_device_capability(index)) < (8, 0):
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no emulation argument and no emulation
        return bool(torch.cuda.is_bf16_supported())


def resolve_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    """The weights' dtype. "auto": fp32 on the CPU (half precision there is slow and lossy) and on GTX 16xx cards
    (fp16 gives them black images), fp16 on other GPUs. An explicit bf16 on a card without it is refused."""
    if settings.precision == "auto":
        if device.type == "cpu":
            return torch.float32
        if fp16_broken(device):
            log.warning("%s gives black images in fp16, so precision 'auto' uses fp32 on it (twice the VRAM; add "
                        "--medvram on a 4 GB card). Start with --precision fp16 to try half precision anyway.",
                        torch.cuda.get_device_name(_cuda_index(device)))
            return torch.float32
        return torch.float16
    if settings.precision == "bf16" and not bf16_supported(device):
        index = _cuda_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        raise StudioError(f"Precision bf16 was asked for, but {torch.cuda.get_device_name(index)} (compute "
                          f"capability {major}.{minor}) has no native bf16 here; it needs compute capability 8.0+ "
                          "(RTX 30xx, A100 and later) and a CUDA 11+ build of torch.", field="precision", fix="use --precision fp16 (or auto)")
    return _dtypes()[settings.precision]


def configure_backends(settings: Settings, device: torch.device) -> None:
    """CUDA math flags, as A1111's ``enable_tf32``: TF32 for fp32 matmuls and convolutions (Ampere and later; a
    no-op before), cudnn.benchmark when asked for and on GTX 16xx (it makes fp16 work on several of them)."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if settings.allow_tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = settings.allow_tf32
    # off by default: every new image size pays a kernel search on its first step
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark or fp16_broken(device)


def describe(settings: Settings, device: torch.device, dtype: torch.dtype) -> str:
    """The one start-up line: device (name, memory), precision, VAE precision, offload and attention."""
    if device.type == "cuda":
        index = _cuda_index(device)
        props = torch.cuda.get_device_properties(index)
        where = f"cuda:{index} {props.name} ({props.total_memory / GiB:.1f} GiB VRAM, compute " \
                f"{props.major}.{props.minor})"
    elif device.type == "cpu":
        where = f"cpu ({psutil.virtual_memory().total / GiB:.1f} GiB RAM)"
    else:
        where = str(device)
    offload = settings.offload if device.type == "cuda" else "none"
    attention = "xformers (checked at first use)" if settings.xformers and device.type == "cuda" else "sdpa"
    return (f"Device: {where}, precision {dtype_name(dtype)}, VAE {dtype_name(vae_dtype(settings, dtype))}, "
            f"offload {offload}, attention {attention}")


def cpu_build_warning(settings: Settings, device: torch.device, gpus: list | None = None) -> str | None:
    """A warning when an NVIDIA GPU is present (nvidia-smi) but the studio runs elsewhere because torch cannot use
    it; None otherwise (also when another device was asked for on purpose)."""
    if device.type == "cuda" or settings.device != "auto":
        return None
    if gpus is None:
        from .nvidia import nvidia_gpus
        gpus = nvidia_gpus()
    if not gpus:
        return None
    names = ", ".join(g.name for g in gpus)
    if not torch.version.cuda:
        return (f"WARNING: {names} is present, but torch {torch.__version__} is a CPU build, so the studio runs on "
                f"the {device.type.upper()} (many times slower). Fix: reinstall torch with CUDA: "
                "python launch.py --reinstall-torch")
    return (f"WARNING: {names} is present and torch {torch.__version__} is a CUDA {torch.version.cuda} build, but "
            f"CUDA is not available (driver {gpus[0].driver}), so the studio runs on the {device.type.upper()}. "
            f"Fix: update the NVIDIA driver to one that supports CUDA {torch.version.cuda}, or set TORCH_INDEX_URL "
            "to an older CUDA build (https://download.pytorch.org/whl/cuXYZ) and run python launch.py "
            "--reinstall-torch")


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


def xformers_usable(settings: Settings, device: torch.device, cache: dict | None = None) -> bool:
    """xformers asked for, on a CUDA device, and working there: probed once per device (results kept in
    ``cache``, e.g. the manager's), so a broken install warns once and PyTorch's SDPA attention is used instead."""
    if not settings.xformers or device.type != "cuda":
        return False
    key = ("xformers", str(device))
    if cache is not None and key in cache:
        return cache[key]
    ok = probe_xformers(device)
    if cache is not None:
        cache[key] = ok
    return ok


def probe_xformers(device: torch.device) -> bool:
    """Run one tiny memory_efficient_attention on ``device``: a wheel built for another torch or CUDA imports but
    fails here (diffusers' enable call runs the same check and would raise on every job)."""
    if importlib.util.find_spec("xformers") is None:
        log.warning("--xformers: xformers is not installed; PyTorch's scaled-dot-product attention is used. "
                    "Fix: python launch.py --xformers installs it (CUDA only).")
        return False
    try:
        import xformers.ops
        # the shape diffusers checks with (batch 1, 2 tokens, 40 channels), in both dtypes a model may use
        for dtype in (torch.float32, torch.float16):
            q = torch.randn((1, 2, 40), device=device, dtype=dtype)
            xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as exc:  # noqa: BLE001 - a mismatched binary fails in many ways (ImportError, RuntimeError,
        # NotImplementedError, OSError...); any of them means "do not use it"
        version = getattr(sys.modules.get("xformers"), "__version__", "?")
        log.warning("xformers %s does not work with torch %s on %s (%s: %s); PyTorch's scaled-dot-product "
                    "attention is used instead. Fix: pip install a matching xformers, or start without "
                    "--xformers.", version, torch.__version__, device, type(exc).__name__, str(exc)[:200])
        return False
    return True


def move_module(module: Any, target: torch.device, pin: bool = True) -> None:
    """Move a model between RAM and VRAM through page-locked host memory where CUDA is involved.

    A non-blocking CUDA->CPU copy lands in pinned memory (torch allocates the destination pinned), and a
    pinned CPU->CUDA copy is an asynchronous DMA, about twice as fast as from pageable memory. So models parked
    in RAM stay pinned and come back fast. One synchronize makes the CPU copies safe to read.
    """
    params = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    source = params.device if params is not None else target
    cuda = "cuda" in (target.type, source.type)
    module.to(target, non_blocking=pin and cuda)
    if pin and cuda and target.type == "cpu":
        torch.cuda.synchronize(source)


def release_memory(device: torch.device | None = None) -> None:
    """Give freed tensors back: Python GC, the CUDA cache, and glibc's heap (else RSS stays high after evictions)."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
        # pinned host blocks (models parked in RAM by move_module) stay in torch's host cache until emptied
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass
