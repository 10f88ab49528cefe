"""--medvram / --lowvram: accelerate's offload hooks, put on each shared module once and found again later.

diffusers' ``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload`` remove and re-add every hook on each
call (and model offload re-adds them after every pipeline call), so a pipeline view per pass would redo the work
each time. We apply the same accelerate hooks ourselves, once per module, mark the module with the mode and device
they were made for, and only re-wire the model-offload chain (which model makes room for which) per view.

Under sequential offload a module's parameters are ``meta`` tensors between forwards; the real weights live in
the hook's weights map. ``live_tensor`` returns the tensor that really holds a weight, so code that reads or
writes weights (the LoRA patcher) does it in the right place; ``execution_device`` says where inputs must go.
"""
from __future__ import annotations

from typing import Any, Iterable

from .lazy import torch

MARK = "_studio_offload"          # (mode, device) the hooks on the module were made for
HOOK = "_studio_offload_hook"     # model offload: the UserCpuOffloadHook, reused by every view
XFORMERS = "_studio_xformers"     # xformers attention processors are set


def _hooks(module: Any) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])   # a SequentialHook holds several


def execution_device(module: Any, default: Any = None) -> Any:
    """Where ``module`` computes: its offload hook's execution device, else where its parameters are."""
    if module is None:
        return default
    for sub in module.modules() if _hooks(module) else ():
        for hook in _hooks(sub):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    param = next(iter(module.parameters()), None)
    if param is None or param.device.type == "meta":
        return default
    return param.device


def live_tensor(module: Any, name: str) -> Any:
    """The tensor holding ``module.<name>``'s values: under sequential offload the parameter is ``meta`` and the
    values sit in the hook's weights map (writing there is what changes the weights the next forward loads)."""
    tensor = getattr(module, name)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if getattr(hook, "offload", False) and weights is not None and name in weights:
            return weights[name]
    raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device and no offload hook holds it")


def rests_in_ram(module: Any) -> bool:
    """Under sequential offload the parameters are ``meta`` between forwards and the weights already rest in RAM
    (in the hooks): moving the module between memory tiers has nothing to move, and ``.to`` would fail."""
    return getattr(module, "__dict__", {}).get(MARK, ("",))[0] == "lowvram"


def _normalize(device: Any) -> Any:
    # CpuOffload compares the module's device with this one: "cuda" != "cuda:0" would move it on every forward
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _remove(module: Any) -> None:
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)   # puts offloaded weights back into the parameters
    module.__dict__.pop(HOOK, None)
    module.__dict__.pop(MARK, None)


def prepare(chain: list, extra: Iterable, mode: str, device: Any) -> None:
    """Offload hooks for one pipeline view: ``chain`` in run order (text encoders, UNet, VAE), ``extra`` modules
    that run beside it (ControlNets). Hooks already on a module for this mode and device are reused."""
    from accelerate import cpu_offload, cpu_offload_with_hook

    device = _normalize(device)
    mark = (mode, str(device))
    chain = [m for m in chain if m is not None]
    for module in [*chain, *extra]:
        if module.__dict__.get(MARK) == mark:
            continue
        if module.__dict__.get(MARK) is not None or hasattr(module, "_hf_hook"):
            _remove(module)
        if mode == "medvram":
            module.to("cpu")
            _, user_hook = cpu_offload_with_hook(module, device)
            module.__dict__[HOOK] = user_hook
        else:
            # diffusers' enable_sequential_cpu_offload does exactly this per component
            cpu_offload(module, device, offload_buffers=len(module._parameters) > 0)
        module.__dict__[MARK] = mark
    if mode == "medvram":
        # as diffusers' model_cpu_offload_seq: each model sends the one before it back to the CPU when it runs;
        # re-wired per view because a VAE or text encoder may be shared by several checkpoints
        prev = None
        for module in chain:
            user_hook = module.__dict__[HOOK]
            user_hook.hook.prev_module_hook = prev
            prev = user_hook


def offload_idle(modules: Iterable) -> None:
    """Send every model-offloaded module back to the CPU, as diffusers' ``maybe_free_model_hooks`` does after each
    call: the chain only frees the model before the running one, and ControlNets are outside the chain."""
    for module in modules:
        user_hook = getattr(module, "__dict__", {}).get(HOOK)
        param = next(iter(module.parameters()), None) if user_hook is not None else None
        if param is not None and param.device.type != "cpu":
            user_hook.offload()


def enable_xformers(modules: Iterable) -> None:
    """xformers attention on the diffusers modules of a view, set once per module (not per view)."""
    for module in modules:
        if module is None or module.__dict__.get(XFORMERS):
            continue
        if hasattr(module, "enable_xformers_memory_efficient_attention"):   # diffusers ModelMixin
            module.enable_xformers_memory_efficient_attention()
        module.__dict__[XFORMERS] = True
