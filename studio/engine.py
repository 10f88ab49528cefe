"""Engine.generate: runs one GenerationRequest (txt2img, img2img, inpaint, hires fix) on the shared models."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from PIL import Image

from . import oom
from . import vae_codec
from .errors import JobInterrupted, StudioError
from .filenames import NameContext
from .img2img import prepare
from .infotext import INFOTEXT_VERSION, build_params, format_infotext
from .lazy import torch
from .manager import Loaded, PipelineManager
from .onnx.runtime import for_job as onnx_for_job
from .outputs import OutputWriter
from .prompt_parser import extract_extra_networks
from .prompts import Conditioning, PromptEncoder
from .request import GenerationRequest, GenerationResult
from .samplers import resolve_sampler
from .settings import Settings
from .speedups import job_options
from .passes import BatchRun
from .upscalers import Upscalers

log = logging.getLogger(__name__)


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise tensors (A1111's variation seed)."""
    a_n, b_n = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    dot = (a_n * b_n).sum(1).clamp(-1.0, 1.0)
    if (dot.abs() > 0.9995).all():
        return (1 - t) * a + t * b
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * a + (torch.sin(t * omega) / so).unsqueeze(1) * b


class _NoContext:
    """Stand-in JobContext for direct engine calls outside the queue."""

    job_id = ""
    interrupted = False
    skipped = False

    def set_progress(self, *a: Any, **k: Any) -> None: ...
    def set_preview(self, obj: Any) -> None: ...
    def clear_skip(self) -> None: ...


class Engine:
    """Turns requests into images. Call it from the job queue (``Studio.submit``) so jobs never overlap."""

    def __init__(self, settings: Settings, manager: PipelineManager, outputs: OutputWriter,
                 upscalers: Upscalers | None = None, prompts: PromptEncoder | None = None,
                 loras: Any = None, embeddings: Any = None, extensions: Any = None, controlnets: Any = None,
                 preprocessors: Any = None):
        self.settings = settings
        self.controlnets = controlnets
        self.preprocessors = preprocessors
        self.extensions = extensions
        self.loras = loras
        self.embeddings = embeddings
        self.manager = manager
        self.outputs = outputs
        self.upscalers = upscalers or Upscalers()
        self.prompts = prompts or PromptEncoder()

    # ---- seeds and noise -----------------------------------------------------------------------------
    @staticmethod
    def resolve_seeds(request: GenerationRequest) -> tuple[list[int], list[int]]:
        """Seed -1 is random; image i of the whole job uses seed + i, as in A1111."""
        total = request.batch_size * request.n_iter
        seed = request.seed if request.seed != -1 else secrets.randbelow(2**32)
        subseed = request.subseed if request.subseed != -1 else secrets.randbelow(2**32)
        return [(seed + i) % 2**32 for i in range(total)], [(subseed + i) % 2**32 for i in range(total)]

    def noise_device(self, request: GenerationRequest) -> torch.device:
        """Where the initial noise is drawn: the request's RNG ("CPU" / "GPU" = the device), else the setting."""
        source = request.rng or ("CPU" if self.settings.rng == "cpu" else "GPU")
        return torch.device("cpu" if source == "CPU" else self.manager.device)

    def _generators(self, seeds: list[int], request: GenerationRequest) -> list[torch.Generator]:
        device = self.noise_device(request)
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def _variation_latents(self, request: GenerationRequest, loaded: Loaded, seeds: list[int],
                           subseeds: list[int]) -> torch.Tensor:
        shape = (1, loaded.vae.config.latent_channels, request.height // 8, request.width // 8)
        out = []
        for seed, sub in zip(seeds, subseeds):
            gen, sub_gen = self._generators([seed, sub], request)
            base = torch.randn(shape, generator=gen, device=gen.device)
            var = torch.randn(shape, generator=sub_gen, device=sub_gen.device)
            out.append(_slerp(request.subseed_strength, base.flatten(1), var.flatten(1)).view(shape))
        return torch.cat(out).to(self.manager.device, loaded.components.unet.dtype)

    # ---- VAE (studio/vae_codec.py: the VAE's dtype on the execution device) ---------------------------------
    def decode(self, pipe: Any, latents: torch.Tensor, warnings: list[str]) -> list[Image.Image]:
        """Latents -> PIL images the way the diffusers pipeline does it, retrying in fp32 on NaNs."""
        return vae_codec.decode(pipe, latents, warnings)

    def encode(self, pipe: Any, image: Image.Image, warnings: list[str] | None = None) -> torch.Tensor:
        """PIL -> scaled latents (the distribution's mode: deterministic), in the VAE's dtype."""
        return vae_codec.encode(pipe, image, warnings)

    # ---- the job -------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, ctx: Any = None) -> GenerationResult:
        """Run ``request``; ``ctx`` is the job context (progress, preview, interrupt/skip).

        Out of device memory, every other cached model is moved off the device and the job runs once more."""
        ctx = ctx or _NoContext()
        return oom.retry_once(lambda: self._generate(request, ctx),
                              lambda: self.manager.free_device_memory(keep=request.checkpoint), request)

    def _generate(self, request: GenerationRequest, ctx: Any) -> GenerationResult:
        if self.extensions is not None and self.extensions.has("studio_adjust_request"):
            request = self.extensions.adjust_request(request)
        request.validate(self.settings)
        sampler, schedule = resolve_sampler(request.sampler_name, request.scheduler)
        hr_upscaler = self.upscalers.get(request.hr_upscaler) if request.enable_hr else None
        hr_sampler = resolve_sampler(request.hr_sampler_name or sampler,
                                     request.hr_scheduler or schedule) if request.enable_hr else None
        seeds, subseeds = self.resolve_seeds(request)
        result = GenerationResult(request=request, job_id=ctx.job_id, job_timestamp=time.strftime("%Y%m%d%H%M%S"))
        prepared = None
        if request.mode in ("img2img", "inpaint"):
            prepared = prepare(request, self.settings.max_width * self.settings.max_height * 4, result.warnings)
        with self.manager.acquire(request.checkpoint, request.vae) as loaded, contextlib.ExitStack() as held:
            self._check_family(request, loaded)
            control = self._load_controlnets(request, loaded, held)
            result.model_name = loaded.info.model_name
            result.model_hash = loaded.info.short_hash or ""
            if loaded.vae_info is not None:
                result.vae_name, result.vae_hash = loaded.vae_info.name, loaded.vae_info.short_hash or ""
            prompt, networks = extract_extra_networks(request.prompt)
            negative, _ = extract_extra_networks(request.negative_prompt)
            adapter_key, lora_hashes = self._activate_networks(loaded, networks, result.warnings)
            held.enter_context(job_options(self.settings, loaded.components, loaded.vae, self.manager.device,
                                           result.warnings, self.manager.offloading))
            onnx_infotext = held.enter_context(onnx_for_job(self, request, loaded, networks, result.warnings))
            embeddings = self._embeddings(loaded)
            used_embeddings: set[str] = set()

            def conds(steps: int, text: str = prompt, neg: str = negative) -> Conditioning:
                try:
                    cond = self.prompts.encode(loaded.components, text, neg, steps=steps, clip_skip=request.clip_skip,
                                               state_key=(loaded.key, adapter_key), embeddings=embeddings,
                                               check=getattr(ctx, "check", None),
                                               max_chunks=self.settings.max_prompt_chunks)
                except JobInterrupted as exc:  # Interrupt while encoding: the images made so far are the result
                    result.interrupted = True
                    exc.result = result
                    raise
                used_embeddings.update(cond.embeddings_used)
                return cond

            total = len(seeds)
            for batch in range(request.n_iter):
                if ctx.interrupted or getattr(ctx, "stopped_by_extension", False):
                    break
                lo, hi = batch * request.batch_size, (batch + 1) * request.batch_size
                run = BatchRun(self, request, loaded, ctx, seeds[lo:hi], subseeds[lo:hi], lo, total, result, control)
                run.infotext.update(onnx_infotext)     # {"ONNX": provider} when the job runs on its export
                if request.mode == "txt2img":
                    images = run.txt2img(conds, sampler, schedule)
                    if request.enable_hr and not ctx.interrupted:
                        images = run.hires(images, hr_upscaler, hr_sampler, conds)
                    elif request.enable_hr:  # stopped in the first pass: its latents are the image
                        images = self.decode(run.pipe, images, result.warnings)
                else:
                    images = run.img2img(prepared, conds, sampler, schedule)
                run.record_steps_done()
                if ctx.skipped:
                    ctx.clear_skip()
                if lora_hashes:
                    run.infotext["Lora hashes"] = lora_hashes
                if used_embeddings and self.embeddings is not None:
                    pairs = [(n, self.embeddings.hash(n)) for n in sorted(used_embeddings)]
                    run.infotext["TI hashes"] = self.loras.infotext_hashes([p for p in pairs if p[1]])
                for i, image in enumerate(images):
                    self._finish_image(result, request, image, seeds[lo + i], subseeds[lo + i], loaded, sampler,
                                       schedule, run.infotext, all_seeds=seeds)
                if batch == 0:
                    self._save_detected_maps(run, result)
            result.interrupted = bool(ctx.interrupted) or getattr(ctx, "stopped_by_extension", False)
        return result

    @staticmethod
    def _check_family(request: GenerationRequest, loaded: Loaded) -> None:
        """What the loaded model's family cannot take, refused before any work (sizes its latents cannot hold)."""
        spec = loaded.components.spec
        m = spec.size_multiple
        sizes = [(request.width, request.height)] + ([request.hr_size] if request.enable_hr else [])
        for w, h in sizes:
            if w % m or h % m:
                raise StudioError(f"{w}x{h} does not fit {spec.label} models: width and height must be multiples "
                                  f"of {m}.", field="width",
                                  fix=f"use {w // m * m or m}x{h // m * m or m} (or another multiple of {m})")

    def _load_controlnets(self, request: GenerationRequest, loaded: Loaded, held: contextlib.ExitStack) -> list:
        """Load (or reuse) each enabled unit's ControlNet, locked for the job: [(unit, module)]."""
        units = [u for u in request.controlnet_units if getattr(u, "enabled", False)]
        if not units:
            return []
        from .controlnet import check_family, controlnet_family, load_controlnet
        from .loading.sizes import module_bytes

        unet = loaded.components.unet
        out = []
        for unit in units:
            info = self.controlnets.find(unit.model, field=unit.f("model"))
            if info is None:
                raise StudioError(f"ControlNet unit {unit.index} is enabled but has no model.", field=unit.f("model"),
                                  fix="pick a ControlNet model, or disable the unit")
            time_dim = getattr(unet.config, "addition_time_embed_dim", None)
            key = self.controlnets.key(info) + (str(self.manager.dtype), time_dim)
            net = held.enter_context(self.manager.acquire_module(
                key, f"ControlNet {info.title}",
                lambda info=info: load_controlnet(info.path, dtype=self.manager.dtype,
                                                  addition_time_embed_dim=time_dim)[0],
                size_hint=module_bytes(info.path, self.manager.dtype.itemsize)))
            check_family(controlnet_family(net), loaded.components.family, (info.title, loaded.info.title),
                         field=unit.f("model"))
            out.append((dataclasses.replace(unit, model=info.title), net))
        return out

    def _save_detected_maps(self, run: "BatchRun", result: GenerationResult) -> None:
        """Each unit's detected map, kept in the result and (setting on) saved beside the first image."""
        maps = getattr(run, "detected_maps", [])
        result.control_maps = [m for _, m in maps]
        if not (maps and result.paths and self.settings.controlnet_save_maps):
            return
        first = Path(result.paths[0])
        for unit, image in maps:
            if getattr(unit, "save_detected_map", True):
                target = first.with_name(f"{first.stem}-controlnet{unit.index}.png")
                tmp = target.with_name(f".{target.name}.tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, target)

    def _activate_networks(self, loaded: Loaded, networks: list, warnings: list[str]) -> tuple[tuple, str]:
        """Patch the job's LoRAs into the live weights (an unchanged set costs nothing); (te state, hashes)."""
        from .adapters import patcher_for

        loras = [n for n in networks if n.kind == "lora"]
        for net in networks:
            if net.kind != "lora":
                warnings.append(f"<{net.kind}:{net.name}> is not supported by this studio and was ignored.")
        if self.loras is None:
            return (), ""
        try:
            tags = [(n.name, n.te_weight, n.unet_weight) for n in loras]
        except ValueError:
            raise StudioError("A <lora:name:weight> tag has a weight that is not a number.", field="prompt",
                              fix="write it like <lora:name:0.8>") from None
        active, warns = self.loras.resolve(tags)
        patcher = patcher_for(loaded.components, self.settings)
        warns += patcher.apply(active)
        warnings.extend(w for w in warns if w not in warnings)
        applied = {name for name, _, _ in patcher.applied}
        pairs = []
        for net in loras:  # A1111 lists each LoRA by the name written in the prompt
            info = self.loras.find(net.name)
            if info is not None and Path(info.path).stem in applied:
                pairs.append((net.name, self.loras.hash(info)))
        return patcher.te_key, self.loras.infotext_hashes(pairs) if pairs else ""

    def _embeddings(self, loaded: Loaded) -> dict:
        if self.embeddings is None or not loaded.components.spec.embeddings:
            return {}
        fitted, _skipped = self.embeddings.for_model(loaded.components)
        return fitted

    def _finish_image(self, result: GenerationResult, request: GenerationRequest, image: Any, seed: int,
                      subseed: int, loaded: Loaded, sampler: str, schedule: str, extra: dict,
                      all_seeds: list[int] | None = None) -> None:
        self.manager.ensure_hashes(loaded)  # a first load hashes in the background: the infotext waits for it
        result.model_hash = loaded.info.short_hash or ""
        if loaded.vae_info is not None:
            result.vae_hash = loaded.vae_info.short_hash or ""
        shown = request.replace(sampler_name=sampler, scheduler=schedule)
        params = build_params(shown, seed=seed, subseed=subseed, model_name=loaded.info.model_name,
                              model_hash=loaded.info.short_hash,
                              vae_name=loaded.vae_info.name if loaded.vae_info else None,
                              vae_hash=loaded.vae_info.short_hash if loaded.vae_info else None,
                              version=INFOTEXT_VERSION, extra=extra or None,
                              rng="CPU" if self.noise_device(request).type == "cpu" else None)
        ext = self.extensions
        if ext is not None and ext.has("studio_after_image"):
            from .extension_api import ImageContext
            for _name, keys in ext.call("studio_after_image", image=ImageContext(image, request, seed,
                                                                               len(result.images), dict(params))):
                if isinstance(keys, dict):
                    version = params.pop("Version", None)
                    params.update({str(k): v for k, v in keys.items() if v is not None})
                    if version is not None:
                        params["Version"] = version
        infotext = format_infotext(request.prompt, request.negative_prompt, params)
        names = NameContext.from_request(request, seed=seed, image=image, index=len(result.images),
                                         all_seeds=all_seeds or [seed], sampler=sampler, scheduler=schedule,
                                         model_name=loaded.info.model_name, model_hash=loaded.info.short_hash or "",
                                         job_timestamp=result.job_timestamp)
        result.images.append(image)
        result.seeds.append(seed)
        result.subseeds.append(subseed)
        result.prompts.append(request.prompt)
        result.negative_prompts.append(request.negative_prompt)
        result.infotexts.append(infotext)
        if request.save_images and self.settings.save_images:
            folder = "img2img" if request.mode in ("img2img", "inpaint") else "txt2img"
            # the live setting: a pattern saved in Settings applies to the next image
            path = self.outputs.save(image, mode=folder, seed=seed, infotext=infotext,
                                     pattern=self.settings.filename_pattern, context=names)
            result.paths.append(str(path))
            if ext is not None and ext.has("studio_image_saved"):
                from .extension_api import SavedImage
                ext.call("studio_image_saved", saved=SavedImage(str(path), infotext, request))
