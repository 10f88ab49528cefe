"""Per-job speed options on the loaded modules: torch.compile, channels_last, fused QKV projections, the SDPA
backend, VAE tiling.

Each is a setting and off by default (each may change the float rounding, so pixels). They are applied around one
job by :func:`job_options`; what they set on a module (compiled forward, memory format) stays on it while it is
cached, so the next job at the same size pays nothing, and is undone when the setting is turned off.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .errors import StudioError
from .lazy import torch

# what torch offers on a CPU: flash (its C++ kernel) and math; the others are CUDA kernels
_CPU_SDPA = ("flash", "math")


@contextlib.contextmanager
def job_options(settings: Any, components: Any, vae: Any, device: Any, warnings: list[str],
                offloading: bool = False) -> Iterator[dict]:
    """Apply the speed settings for one job (after its LoRAs are patched in); yields the infotext entries they add
    (none: they keep the picture within float rounding, and A1111 / Forge write nothing for theirs)."""
    from .adapters.patcher import patched_key
    denoiser = components.unet
    _memory_format(denoiser, settings.channels_last)
    _fused_qkv(denoiser, settings.fused_qkv, warnings, offloading, patched_key(components))
    _compiled(denoiser, settings.compile_backend)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_vae_tiling(vae, settings.vae_tiling))
        backend = settings.sdpa_backend
        if backend != "auto":
            if getattr(device, "type", str(device)) != "cuda" and backend not in _CPU_SDPA:
                note = (f"SDPA backend {backend!r} is a CUDA kernel; on {device} attention used PyTorch's automatic "
                        "choice.")
                if note not in warnings:
                    warnings.append(note)
            else:
                stack.enter_context(sdpa_kernel(backend))
        yield {}


def sdpa_kernel(backend: str) -> Any:
    """torch's context that limits scaled_dot_product_attention to one backend."""
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as kernel
    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return kernel([names[backend]])


def _memory_format(module: Any, channels_last: bool) -> None:
    """channels_last for convolutional denoisers (UNets: NHWC convolutions are faster on tensor cores)."""
    if module is None or not any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
        return
    wanted = torch.channels_last if channels_last else torch.contiguous_format
    if getattr(module, "_studio_memory_format", torch.contiguous_format) != wanted:
        module.to(memory_format=wanted)
        module._studio_memory_format = wanted


_FUSED = ("to_qkv", "to_kv", "to_added_qkv")


def _fused_qkv(module: Any, on: bool, warnings: list[str], offloading: bool, patched: tuple) -> None:
    """diffusers' ``fuse_qkv_projections``: one matmul for q, k and v (k and v in cross-attention).

    The fused copies are built from the live weights, so from the LoRA-patched ones; they are kept for the next job
    while the weights are the same (the same LoRA set ``patched``, the same tensors), else fused again: rebuilding
    them each job would also make torch.compile trace again. Off, they are dropped.
    """
    if module is None:
        return
    attns = [m for m in module.modules() if hasattr(m, "fuse_projections") and getattr(m, "to_q", None) is not None]
    fused = getattr(module, "_studio_qkv", None)
    usable = bool(attns) and hasattr(module, "fuse_qkv_projections")
    why = None
    if on and usable and offloading:
        why = "with --medvram / --lowvram (the fused layers would miss the offload hooks)"
    elif on and usable and not all(_plain(m) for m in attns):
        why = "on quantised weights (int8, fp8, GGUF)"
    if on and usable and why is None:
        print_ = (patched, _fingerprint(attns))
        if fused == print_:
            return
        if fused is not None:
            _unfuse(module, attns)
        with torch.no_grad():
            module.fuse_qkv_projections()
        module._studio_qkv = print_
        return
    if on:
        note = f"Fused QKV projections are not used {why or 'on this model (diffusers cannot fuse it)'}."
        if note not in warnings:
            warnings.append(note)
    if fused is not None:
        _unfuse(module, attns)


def _plain(attn: Any) -> bool:
    weights = [getattr(attn, n).weight for n in ("to_q", "to_k", "to_v")]
    return all(type(w.data) is torch.Tensor and w.dtype.is_floating_point and w.dtype.itemsize >= 2
               for w in weights)


def _fingerprint(attns: list) -> tuple:
    """The q / k / v tensors' storage: changes when one is replaced (the LoRA patcher writes through ``.data``,
    which no version counter sees: its set key tells those)."""
    return tuple(w.data_ptr() for m in attns for w in (m.to_q.weight, m.to_k.weight, m.to_v.weight))


def _unfuse(module: Any, attns: list) -> None:
    module.unfuse_qkv_projections()      # the attention processors as they were
    for m in attns:                      # and without the fused copies diffusers leaves behind
        for name in _FUSED:
            if hasattr(m, name):
                delattr(m, name)
        m.fused_projections = False
    module._studio_qkv = None


def _compiled(module: Any, backend: str) -> None:
    """``module.compile`` in place (the pipelines keep the same object); dynamo caches one graph per input shape
    and dtype on it, so only a new size or dtype compiles again. "" undoes it."""
    if module is None:
        return
    current = getattr(module, "_studio_compile", "")
    if current == backend:
        return
    if backend:
        try:
            module.compile(backend=backend, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - torch names the reason (no compiler, an unknown backend)
            raise StudioError(f"torch.compile with backend {backend!r} failed: {exc}", field="compile_backend",
                              fix="pick another backend (inductor needs a C++ compiler) or leave it empty") from None
    else:
        module._compiled_call_impl = None     # what nn.Module.compile set: the plain forward again
    module._studio_compile = backend


@contextlib.contextmanager
def _vae_tiling(vae: Any, on: bool) -> Iterator[None]:
    """Decode and encode in overlapping tiles (diffusers' own): big pictures in a fixed amount of memory. Small
    latents are not tiled by diffusers at all, so only large images change."""
    if not on or vae is None or not hasattr(vae, "enable_tiling"):
        yield
        return
    was = getattr(vae, "use_tiling", False)
    vae.enable_tiling()
    try:
        yield
    finally:
        if not was:
            vae.disable_tiling()
