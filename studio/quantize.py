"""Weight quantisation of a loaded checkpoint (setting ``quantize``), applied by the PipelineManager per model.

- ``int8``: weight-only int8 through torchao (``Int8WeightOnlyConfig``: one int8 per weight plus one fp32 scale
  per output row), for every ``nn.Linear`` of the denoiser and the text encoders, on any device. Activations stay
  in the model's dtype; each layer widens its int8 weight as it runs, so it saves memory, not time. torchao has no
  int8 convolution, so convolutions (much of an SD UNet's ResNets), embeddings, norms and the VAE stay float.
- ``fp8``: fp8 (e4m3) storage of the denoiser's layers, cast up to the compute dtype as each runs (diffusers'
  layerwise casting, what fp8 FLUX files already get). CUDA only: on another device nothing is changed and a note
  says so.

Weights a file already keeps quantised (GGUF's ``GGUFParameter``, fp8 files' layerwise-cast layers) are left as
they are: only plain fp32 / fp16 / bf16 weights are quantised. Quantising happens on the CPU right after
loading, before the move to the device, so the card never holds the float copy.

For LoRAs (``adapters.patcher``): ``dequantised`` gives a quantised weight's float values and ``like`` quantises
patched values the same way: a LoRA on an int8 model is its int8 values plus the LoRA, quantised again (the
float originals are not kept), within about one int8 step of the float LoRA-merged weights.
"""
from __future__ import annotations

import logging
from typing import Any

from .lazy import torch

log = logging.getLogger(__name__)

_FLOATS = ("float32", "float16", "bfloat16")


def effective(mode: str, device: Any) -> str:
    """The quantisation that will really be applied on ``device`` (fp8 storage needs CUDA)."""
    if mode == "fp8" and getattr(device, "type", str(device)) != "cuda":
        return "none"
    return mode


def is_quantised(t: Any) -> bool:
    """A torchao tensor subclass (int8 data plus scales behind a float-looking tensor)."""
    return type(t).__module__.startswith("torchao.")


def tensor_bytes(t: Any) -> int:
    """Bytes ``t`` really holds: for a torchao tensor its inner tensors (int8 data, scales), whose wrapper
    reports the float dtype's element size; for anything else numel × element size."""
    if is_quantised(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers as held (quantised ones at their real size)."""
    return sum(tensor_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


def dequantised(t: Any) -> torch.Tensor:
    """The float32 values of a (possibly quantised) weight."""
    if is_quantised(t):
        return t.dequantize(torch.float32)
    return t.detach().float()


def like(t: Any, values: torch.Tensor) -> torch.Tensor:
    """``values`` stored the way ``t`` is: quantised again with fresh scales if ``t`` is quantised, else cast to
    its dtype."""
    if is_quantised(t):
        return type(t).from_hp(values.to(t.dtype), granularity=_granularity(t))
    return values.to(t.dtype)


def copy_of(t: Any, device: str = "cpu") -> torch.Tensor:
    """An independent copy on ``device`` (``.to(copy=True)`` on a torchao tensor on the same device shares its
    int8 data, so it would be overwritten with the live weight)."""
    if is_quantised(t):
        return t.detach().to(device).clone()
    return t.detach().to(device, copy=True)


def _granularity(t: Any) -> Any:
    from torchao.quantization.granularity import PerRow, PerTensor
    return PerTensor() if t.scale.numel() == 1 else PerRow()


def _plain_linear(module: Any, fqn: str = "") -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(module, torch.nn.Linear) and type(weight) is torch.nn.Parameter
            and str(weight.dtype).removeprefix("torch.") in _FLOATS)


def _int8(module: Any) -> tuple[int, int]:
    """Quantise every plain float ``nn.Linear`` of ``module`` in place; returns (layers done, layers skipped)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        from .errors import StudioError
        raise StudioError("quantize=int8 needs the torchao package, which is not installed.", field="quantize",
                          fix="run python launch.py once more (it installs torchao from requirements.txt), or set "
                              "quantize to none") from e
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    todo = sum(_plain_linear(m) for m in linears)
    if todo:
        # set_inductor_config=False: the default changes torch.compile's global settings for the whole process
        quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=_plain_linear)
    return todo, len(linears) - todo


def _fp8(module: Any, compute_dtype: Any) -> bool:
    """fp8 storage for a diffusers denoiser; False when it already stores fp8 layers (an fp8 file) or is GGUF."""
    weights = [p for p in module.parameters() if p.ndim >= 2]
    if any(type(p) is not torch.nn.Parameter or str(p.dtype).removeprefix("torch.") not in _FLOATS
           for p in weights):
        return False
    module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    return True


def apply(components: Any, mode: str, device: Any, dtype: Any) -> list[str]:
    """Quantise a freshly loaded checkpoint's modules in place for ``mode``; returns notes for the user."""
    if mode == "none":
        return []
    if mode == "fp8":
        if effective(mode, device) == "none":
            note = (f"quantize=fp8 needs a CUDA device; on {device} the weights were left as they are (for less "
                    "memory on the CPU use --quantize int8)")
            log.warning(note)
            return [note]
        if not _fp8(components.unet, dtype):
            return ["quantize=fp8: the denoiser's weights are already stored quantised in the file; kept as they are"]
        return [f"denoiser weights stored in fp8 (e4m3), computed in {str(dtype).removeprefix('torch.')}"]
    before = components.nbytes()
    parts, skipped = [], 0
    for name, module in components.modules().items():
        if name == "vae":     # small, all convolutions, and its errors show directly in the pixels
            continue
        done, left = _int8(module)
        skipped += left
        if done:
            parts.append(f"{name} {done}")
    after = components.nbytes()
    if not parts:
        return ["quantize=int8: no float linear layers to quantise (the file's weights are already quantised)"]
    note = (f"int8 weight-only: linear layers quantised ({', '.join(parts)}); convolutions, embeddings, norms and "
            f"the VAE stay float; {before / 2**20:.0f} MB -> {after / 2**20:.0f} MB")
    if skipped:
        note += f"; {skipped} linear layers already quantised in the file were left as stored"
    log.info(note)
    return [note]
