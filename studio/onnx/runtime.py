"""Run a job's UNet and VAE in onnxruntime sessions of the checkpoint's export (setting ``onnx_runtime``).

The sessions stand behind the torch modules' own ``forward`` / ``decode`` / ``encode`` for the job (as DeepCache
wraps the UNet for a pass), so the modules keep their ``config``, ``dtype`` and ``device`` and the pipelines,
samplers, previews and infotext are the same as on torch. A call the export cannot take (ControlNet residuals,
an IP-adapter's image embeddings, VAE tiling, a VAE the NaN retry moved to fp32) runs on torch.

Sessions are cached by the pipeline manager like any module (LRU, memory budgets, locked while a job runs): on a
CPU they hold a second copy of the weights beside the torch modules, which the RAM budget counts. Inputs go
through host memory (numpy), which on CUDA costs a copy each way per step (IOBinding would avoid it; not done).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import StudioError
from ..lazy import torch
from .export import find_export, providers, require_onnxruntime, unsupported

RUNTIME_PARTS = ("unet", "vae_decoder", "vae_encoder")
# UNet keyword arguments the export has no input for: a call with any of them runs on torch
_TORCH_ONLY = ("class_labels", "timestep_cond", "attention_mask", "encoder_attention_mask",
               "down_block_additional_residuals", "mid_block_additional_residual",
               "down_intrablock_additional_residuals")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}
HOW_TO_EXPORT = "export it in Settings (Speed: \"Export current checkpoint to ONNX\") or POST /sdapi/v1/export/onnx"


class Sessions:
    """The onnxruntime sessions of one export. Shaped like a module for the pipeline manager's cache: it has no
    parameters, its bytes (the graphs' weights) are told by a ``meta`` buffer (no memory), and ``to`` is a no-op
    (a session stays where its provider put it)."""

    def __init__(self, folder: Path, manifest: dict, provider_list: list):
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        # no spin-waiting after a run: torch (sampler, text encoder) and the server share the CPU cores, and
        # spinning threads slowed every step on this 2-core machine (UNet call 1.5 s -> 1.05 s without)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.manifest = manifest
        self.sessions: dict[str, Any] = {}
        self.nbytes = 0
        for name in RUNTIME_PARTS:
            entry = manifest["parts"].get(name)
            if entry is None:
                continue
            path = folder / entry["file"]
            self.nbytes += sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
            self.sessions[name] = ort.InferenceSession(str(path), options, providers=provider_list)
        self.provider = self.sessions["unet"].get_providers()[0]

    @property
    def label(self) -> str:
        """The provider as the infotext names it: "CPU", "CUDA", "Tensorrt"."""
        return self.provider.replace("ExecutionProvider", "")

    def run(self, name: str, inputs: list, like: Any) -> Any:
        """Run part ``name`` on torch tensors (converted to what each input of the graph takes); the first output
        as a tensor on ``like``'s device and dtype."""
        session = self.sessions[name]
        feeds = {}
        for meta, tensor in zip(session.get_inputs(), inputs):
            dtype = getattr(torch, _ORT_TYPES.get(meta.type, "float32"))
            feeds[meta.name] = tensor.detach().to("cpu", dtype).contiguous().numpy()
        out = session.run(None, feeds)[0]
        return torch.from_numpy(out).to(like.device, like.dtype)

    # ---- what the pipeline manager's cache asks of a module ------------------------------------------------
    def parameters(self) -> Iterator[Any]:
        return iter(())

    def buffers(self) -> Iterator[Any]:
        return iter([torch.empty(self.nbytes, dtype=torch.uint8, device="meta")])

    def to(self, *args: Any, **kwargs: Any) -> "Sessions":
        return self


@contextlib.contextmanager
def _replaced(module: Any, attr: str, fn: Callable) -> Iterator[None]:
    """``module.attr`` is ``fn`` within the block; an attribute set on the instance before (accelerate's hook)
    is put back."""
    own = module.__dict__.get(attr)
    setattr(module, attr, fn)
    try:
        yield
    finally:
        if own is None:
            delattr(module, attr)
        else:
            setattr(module, attr, own)


def _unet_forward(unet: Any, sessions: Sessions, warn: Callable[[str], None]) -> Callable:
    whole = unet.forward
    added_names = sessions.manifest["parts"]["unet"]["inputs"][3:]     # SDXL: text_embeds, time_ids

    def forward(sample, timestep, encoder_hidden_states=None, *args, **kw):
        added = kw.get("added_cond_kwargs") or {}
        if (args or any(kw.get(k) is not None for k in _TORCH_ONLY) or kw.get("cross_attention_kwargs")
                or set(added) - set(added_names)):
            warn("Some UNet calls ran on torch: ControlNet / adapter residuals and IP-adapter inputs are not in the "
                 "ONNX export.")
            return whole(sample, timestep, encoder_hidden_states, *args, **kw)
        t = torch.as_tensor(timestep, device=sample.device).float().reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        out = sessions.run("unet", [sample, t, encoder_hidden_states, *(added[n] for n in added_names)], sample)
        if kw.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
            return UNet2DConditionOutput(sample=out)
        return (out,)

    return forward


def _vae_calls(vae: Any, sessions: Sessions) -> dict[str, Callable]:
    """``decode`` / ``encode`` for ``vae`` through the sessions; torch for tiling and once the NaN retry moved the
    VAE to another dtype than the export's."""
    torch_decode, torch_encode = vae.decode, vae.encode
    exported = sessions.manifest["parts"]["vae_decoder"]["dtype"]

    def own_path() -> bool:
        return getattr(vae, "use_tiling", False) or str(vae.dtype).replace("torch.", "") != exported

    def decode(z, return_dict: bool = True, generator: Any = None):
        if own_path():
            return torch_decode(z, return_dict=return_dict)
        out = sessions.run("vae_decoder", [z], z)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput
            return DecoderOutput(sample=out)
        return (out,)

    def encode(x, return_dict: bool = True):
        if own_path() or "vae_encoder" not in sessions.sessions:
            return torch_encode(x, return_dict=return_dict)
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        dist = DiagonalGaussianDistribution(sessions.run("vae_encoder", [x], x))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    return {"decode": decode, "encode": encode}


def _torch_reason(engine: Any, request: Any, loaded: Any, networks: list) -> str | None:
    """Why this job cannot run on the export (None: it can)."""
    loras = [n.name for n in networks if n.kind == "lora"]
    if loras:
        return (f"the prompt has LoRAs ({', '.join(f'<lora:{n}>' for n in loras)}), which the exported weights do "
                "not include")
    if any(getattr(u, "enabled", False) for u in request.controlnet_units):
        return "ControlNet's residuals enter the UNet, and the export takes none"
    if engine.settings.deepcache_interval > 1:
        return "DeepCache is on (it runs the torch UNet's own blocks); set it to 1 to use ONNX"
    if getattr(engine.settings, "compile_backend", ""):
        return "torch.compile is on (it compiles the torch UNet); clear compile_backend to use ONNX"
    if engine.manager.offloading:
        return "--medvram / --lowvram move torch modules, not onnxruntime sessions"
    return unsupported(loaded.components)


def _warn(warnings: list[str], text: str) -> None:
    if text not in warnings:
        warnings.append(text)


@contextlib.contextmanager
def for_job(engine: Any, request: Any, loaded: Any, networks: list, warnings: list[str]) -> Iterator[dict]:
    """Within the block the job's UNet and VAE run on the checkpoint's ONNX export when the setting asks for it
    and the job allows it; yields the infotext entries to add ({} on torch, with a warning saying why)."""
    if not engine.settings.onnx_runtime:
        yield {}
        return
    try:
        ort = require_onnxruntime()
        reason = _torch_reason(engine, request, loaded, networks)
    except StudioError as exc:  # a missing package: the message says what to install
        ort, reason = None, str(exc)
    found = None
    if reason is None:
        info = loaded.info
        ident = info.name if info.kind == "hub" else engine.manager.registry.ensure_hash(info)
        found = find_export(Path(engine.settings.onnx_path), info, ident)
        if found is None:
            reason = f"{info.name} has no ONNX export yet ({HOW_TO_EXPORT})"
    if reason is not None:
        _warn(warnings, f"ONNX runtime not used: {reason}. This job ran on torch.")
        yield {}
        return
    folder, manifest = found
    plist = providers(engine.manager.device, ort.get_available_providers())
    key = ("onnx", str(folder), manifest.get("created", ""), json.dumps(plist))
    with engine.manager.acquire_module(key, f"ONNX {loaded.info.name}",
                                       lambda: Sessions(folder, manifest, plist)) as sessions, \
            contextlib.ExitStack() as patches:
        comps = loaded.components
        patches.enter_context(_replaced(comps.unet, "forward",
                                        _unet_forward(comps.unet, sessions, lambda t: _warn(warnings, t))))
        if loaded.vae is comps.vae:      # a VAE chosen apart from the checkpoint was not exported: it stays torch
            for name, fn in _vae_calls(comps.vae, sessions).items():
                patches.enter_context(_replaced(comps.vae, name, fn))
        else:
            _warn(warnings, "ONNX runtime: the chosen VAE is not the checkpoint's own (the exported one); it ran on "
                            "torch.")
        yield {"ONNX": sessions.label}
