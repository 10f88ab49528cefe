"""Export a checkpoint's UNet, VAE (decoder, encoder) and CLIP text encoder(s) to ONNX with ``torch.onnx.export``.

The folder follows optimum's layout and input / output names (``unet/model.onnx``: ``sample``, ``timestep``,
``encoder_hidden_states`` [``text_embeds``, ``time_ids``] -> ``out_sample``; ``vae_decoder``: ``latent_sample`` ->
``sample``; ``vae_encoder``: ``sample`` -> ``latent_parameters``; ``text_encoder[_2]``: ``input_ids`` -> ...; not
tried with optimum itself, which is not installed here), weights beside each graph (``model.onnx.data``: ONNX's
protobuf stops at 2 GB). Opset 18: attention is written as plain MatMul / Softmax, which every onnxruntime provider
(CPU, CUDA, TensorRT) runs. Each part is checked against torch on the example inputs before the folder replaces an
older export (written aside, then renamed: never half-written).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import StudioError
from ..hashes import short_hash
from ..lazy import torch

log = logging.getLogger(__name__)

OPSET = 18
MANIFEST = "studio_onnx.json"
# the UNet's inputs beside sample / timestep / text states, per addition_embed_type (SDXL: "text_time")
_ADDED = {None: (), "text_time": ("text_embeds", "time_ids")}
_TOLERANCE = 1e-2     # max |onnx - torch| on the check inputs, relative to the torch output's max |value|


@dataclasses.dataclass
class ExportOutcome:
    """What an export wrote: the checkpoint's title, the folder, each file's bytes and the time it took."""

    title: str
    folder: Path
    files: dict[str, int]
    seconds: float
    max_error: dict[str, float]

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def to_dict(self) -> dict:
        return {"checkpoint": self.title, "folder": str(self.folder), "files": self.files,
                "total_bytes": self.total_bytes, "seconds": round(self.seconds, 1), "max_error": self.max_error}


def providers(device: Any, available: list[str]) -> list:
    """TensorRT, then CUDA when the studio computes on a CUDA device and onnxruntime has them; the CPU always last
    (onnxruntime runs what a provider cannot on the next one)."""
    out: list = []
    if getattr(device, "type", str(device)) == "cuda":
        options = {"device_id": device.index or 0}
        out += [(p, options) for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    return out + ["CPUExecutionProvider"]


def require_onnxruntime() -> Any:
    """The onnxruntime module, or a StudioError saying how to install it (the studio runs on without)."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as exc:
        raise StudioError(f"ONNX needs the packages onnx, onnxruntime and onnxscript ({exc}).", field="onnx_runtime",
                          fix="run python launch.py once (it installs requirements.txt) or pip install -r "
                              "requirements.txt in the studio's environment") from None
    return onnxruntime


def unsupported(components: Any) -> str | None:
    """Why this checkpoint's denoiser has no ONNX path (None: it has one). SD 1.x / 2.x / SDXL UNets only."""
    from diffusers import UNet2DConditionModel

    unet = components.unet
    label = components.spec.label
    if not isinstance(unet, UNet2DConditionModel):
        return f"{label} checkpoints have no ONNX path (it covers the SD 1.x / 2.x / SDXL UNet only)"
    cfg = unet.config
    if cfg.addition_embed_type not in _ADDED or cfg.class_embed_type is not None or cfg.time_cond_proj_dim:
        return f"this {label} UNet has extra conditioning inputs the ONNX path does not export"
    return None


def _tag(ident: str) -> str:
    """The A1111 short hash of a file's sha256; a hub repo's name is hashed first (it holds a '/')."""
    return short_hash(ident if re.fullmatch(r"[0-9a-f]{64}", ident) else hashlib.sha256(ident.encode()).hexdigest())


def folder_name(info: Any, ident: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", info.model_name).strip("._") or "model"
    return f"{stem}-{_tag(ident)}"


def find_export(root: Path, info: Any, ident: str) -> tuple[Path, dict] | None:
    """The export of the checkpoint whose identity (sha256) is ``ident``: (folder, manifest) or None. Found by
    hash, so a renamed file keeps its export."""
    candidates = [root / folder_name(info, ident)]
    if root.is_dir():
        candidates += sorted(root.glob(f"*-{_tag(ident)}"))
    for folder in candidates:
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if manifest.get("sha256") == ident:
            return folder, manifest
    return None


# ---- the modules as ONNX sees them --------------------------------------------------------------------------
def _wrappers() -> dict:
    """nn.Module wrappers with plain tensor inputs and outputs (built on first use: torch is imported lazily)."""
    nn = torch.nn

    class UNetIO(nn.Module):
        def __init__(self, unet: Any):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class UNetTimeIO(UNetIO):     # SDXL: pooled text embeddings and size / crop time ids
        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            cond = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]

    class DecoderIO(nn.Module):
        def __init__(self, vae: Any):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    class EncoderIO(nn.Module):
        def __init__(self, vae: Any):
            super().__init__()
            self.vae = vae

        def forward(self, sample):
            return self.vae.encode(sample).latent_dist.parameters     # mean and log-variance, as optimum gives

    class TextIO(nn.Module):
        def __init__(self, encoder: Any):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids):
            out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
            return (out[0], out[1], *out.hidden_states)

    return {"unet": UNetIO, "unet_time": UNetTimeIO, "decoder": DecoderIO, "encoder": EncoderIO, "text": TextIO}


def _parts(components: Any) -> list[tuple[str, Any, tuple, list[str], list[str], dict]]:
    """(name, module, example inputs, input names, output names, dynamic shapes) of every part to export.

    Batch 2 in every example: torch.export takes a size-1 dimension as fixed."""
    w = _wrappers()
    unet, vae = components.unet, components.vae
    dev, dt = unet.device, unet.dtype
    levels = len(unet.config.block_out_channels) - 1
    side = 2 ** levels * 2                      # the smallest latent every down / up block divides evenly
    text_dim = unet.config.cross_attention_dim
    unet_in = [torch.randn(2, unet.config.in_channels, side, side, device=dev, dtype=dt),
               torch.tensor([999.0, 999.0], device=dev), torch.randn(2, 77, text_dim, device=dev, dtype=dt)]
    unet_names = ["sample", "timestep", "encoder_hidden_states"]
    unet_dyn: list = [{0: "batch", 2: "height", 3: "width"}, {0: "batch"}, {0: "batch", 1: "sequence"}]
    if unet.config.addition_embed_type == "text_time":
        # the pooled text width is the second encoder's projection; the rest are time ids (base 6, refiner 5)
        pooled = components.text_encoder_2.config.projection_dim
        n_time = (unet.config.projection_class_embeddings_input_dim - pooled) // unet.config.addition_time_embed_dim
        unet_in += [torch.randn(2, pooled, device=dev, dtype=dt), torch.randn(2, n_time, device=dev, dtype=dt)]
        unet_names += ["text_embeds", "time_ids"]
        unet_dyn += [{0: "batch"}, {0: "batch"}]
    vdev, vdt = vae.device, vae.dtype
    lat = vae.config.latent_channels
    io = w["unet_time" if len(unet_names) > 3 else "unet"]
    parts = [("unet", io(unet), tuple(unet_in), unet_names, ["out_sample"], tuple(unet_dyn)),
             ("vae_decoder", w["decoder"](vae), (torch.randn(2, lat, 8, 8, device=vdev, dtype=vdt),),
              ["latent_sample"], ["sample"], ({0: "batch", 2: "height", 3: "width"},)),
             ("vae_encoder", w["encoder"](vae), (torch.randn(2, 3, 64, 64, device=vdev, dtype=vdt),),
              ["sample"], ["latent_parameters"], ({0: "batch", 2: "height", 3: "width"},))]
    for attr in ("text_encoder", "text_encoder_2"):
        enc = getattr(components, attr, None)
        if enc is None:
            continue
        ids = torch.randint(0, 49407, (2, 77), device=enc.device)
        with torch.no_grad():
            out = enc(ids, output_hidden_states=True, return_dict=True)
        names = list(out.keys())[:2] + [f"hidden_states.{i}" for i in range(len(out.hidden_states))]
        parts.append((attr, w["text"](enc), (ids,), ["input_ids"], names, ({0: "batch"},)))
    return parts


def _check(path: Path, module: Any, inputs: tuple, names: list[str]) -> float:
    """Max |onnxruntime - torch| on ``inputs``, relative to the torch output's largest value (first output)."""
    ort = require_onnxruntime()
    try:   # on the providers generation will use: an fp16 graph may have no CPU kernel for some operator
        session = ort.InferenceSession(str(path), providers=providers(inputs[0].device,
                                                                      ort.get_available_providers()))
        got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise StudioError(f"onnxruntime cannot run the exported {path.parent.name} ({type(exc).__name__}: {exc}).",
                          field="checkpoint", fix="export in fp32 (--precision fp32), or install onnxruntime-gpu "
                                                  "for the CUDA provider") from None
    with torch.no_grad():
        ref = module(*inputs)
    ref = (ref[0] if isinstance(ref, tuple) else ref).float().cpu()
    err = (torch.from_numpy(got).float() - ref).abs().max().item()
    return err / max(ref.abs().max().item(), 1e-6)


def export_components(components: Any, target: Path, source: dict) -> tuple[dict[str, int], dict[str, float]]:
    """Write every part of ``components`` into ``target`` (a new folder) with its manifest; (files, errors)."""
    require_onnxruntime()
    reason = unsupported(components)
    if reason:
        raise StudioError(f"{source['name']}: {reason}.", field="checkpoint",
                          fix="pick an SD 1.x, SD 2.x or SDXL checkpoint")
    if any(type(p.data) is not torch.Tensor for m in components.modules().values() for p in m.parameters()):
        raise StudioError(f"{source['name']} is loaded with quantised weights, which torch.onnx cannot export.",
                          field="quantize", fix="set quantize to none (Settings), then export")
    from ..adapters import patcher_for
    patcher_for(components).restore()           # the file's own weights, not the last job's LoRAs
    target.mkdir(parents=True)
    errors: dict[str, float] = {}
    entries: dict[str, dict] = {}
    for name, module, inputs, in_names, out_names, dynamic in _parts(components):
        module.eval()
        path = target / name / "model.onnx"
        path.parent.mkdir()
        started = time.monotonic()
        with torch.no_grad(), warnings.catch_warnings():
            # the inputs share one "batch" axis; torch says so once per input
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            torch.onnx.export(module, inputs, str(path), input_names=in_names, output_names=out_names,
                              dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, external_data=True,
                              verbose=False)
        errors[name] = _check(path, module, inputs, in_names)
        log.info("Exported %s in %.1fs (relative max error %.2g)", name, time.monotonic() - started, errors[name])
        if not errors[name] <= _TOLERANCE:
            raise StudioError(f"The ONNX export of the {name} of {source['name']} differs from torch by "
                              f"{errors[name]:.3g} (relative); nothing was kept.", field="checkpoint",
                              fix="export in fp32 (--precision fp32) or report the checkpoint")
        entries[name] = {"file": f"{name}/model.onnx", "inputs": in_names, "outputs": out_names,
                         "dtype": str(next(module.parameters()).dtype).replace("torch.", "")}
    files = {str(p.relative_to(target)): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
    manifest = {**source, "family": components.family, "opset": OPSET, "torch": torch.__version__,
                "parts": entries, "max_error": errors, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    files[MANIFEST] = (target / MANIFEST).stat().st_size
    return files, errors


def export_checkpoint(studio: Any, checkpoint: str = "") -> ExportOutcome:
    """Export ``checkpoint`` (title, name or hash; "" = the current one) into ``models/onnx`` through the job
    queue (after any queued generation). Replaces an older export of the same file."""
    require_onnxruntime()
    return studio.run_exclusive(lambda: _export(studio, checkpoint), kind="export")


def _export(studio: Any, checkpoint: str) -> ExportOutcome:
    started = time.monotonic()
    root = Path(studio.settings.onnx_path)
    with studio.manager.acquire(checkpoint, vae="None") as loaded:    # "None": the checkpoint's own VAE
        info = loaded.info
        ident = info.name if info.kind == "hub" else studio.registry.ensure_hash(info)
        final = root / folder_name(info, ident)
        partial = root / f".partial-{final.name}"
        shutil.rmtree(partial, ignore_errors=True)
        source = {"name": info.name, "path": str(info.path), "sha256": ident}
        try:
            files, errors = export_components(loaded.components, partial, source)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    old = root / f".old-{final.name}"
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    return ExportOutcome(info.title, final, files, time.monotonic() - started, errors)
