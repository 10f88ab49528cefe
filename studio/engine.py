"""Engine.generate: runs one GenerationRequest on the shared pipeline manager (txt2img)."""
from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import torch

from . import __version__
from .errors import StudioError
from .infotext import build_params, format_infotext
from .manager import Loaded, PipelineManager
from .outputs import OutputWriter
from .prompts import encode_for_pipeline
from .request import GenerationRequest, GenerationResult
from .samplers import make_scheduler, resolve_sampler
from .settings import Settings

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

    def __init__(self, settings: Settings, manager: PipelineManager, outputs: OutputWriter):
        self.settings = settings
        self.manager = manager
        self.outputs = outputs

    # ---- seeds and noise -----------------------------------------------------------------------------
    @staticmethod
    def resolve_seeds(request: GenerationRequest) -> tuple[list[int], list[int]]:
        """Seed -1 is random; image i of the whole job uses seed + i, as in A1111."""
        total = request.batch_size * request.n_iter
        seed = request.seed if request.seed != -1 else secrets.randbelow(2**32)
        subseed = request.subseed if request.subseed != -1 else secrets.randbelow(2**32)
        return [(seed + i) % 2**32 for i in range(total)], [(subseed + i) % 2**32 for i in range(total)]

    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        device = "cpu" if self.settings.rng == "cpu" else self.manager.device
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def _variation_latents(self, request: GenerationRequest, loaded: Loaded, seeds: list[int],
                           subseeds: list[int]) -> torch.Tensor:
        unet = loaded.components.unet
        shape = (1, unet.config.in_channels, request.height // 8, request.width // 8)
        out = []
        for seed, sub in zip(seeds, subseeds):
            gen, sub_gen = self._generators([seed, sub])
            base = torch.randn(shape, generator=gen, device=gen.device)
            var = torch.randn(shape, generator=sub_gen, device=sub_gen.device)
            out.append(_slerp(request.subseed_strength, base.flatten(1), var.flatten(1)).view(shape))
        return torch.cat(out).to(self.manager.device, unet.dtype)

    # ---- decoding ------------------------------------------------------------------------------------
    def decode(self, pipe: Any, latents: torch.Tensor, warnings: list[str]) -> list:
        """Latents -> PIL images the way the diffusers pipeline does it, retrying in fp32 on NaNs."""
        vae = pipe.vae
        cfg = vae.config

        def run() -> torch.Tensor:
            z = latents.to(vae.device, vae.dtype)
            mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
            if mean is not None and std is not None:
                mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(z)
                std_t = torch.tensor(std).view(1, -1, 1, 1).to(z)
                z = z * std_t / cfg.scaling_factor + mean_t
            else:
                z = z / cfg.scaling_factor
            with torch.no_grad():
                return vae.decode(z, return_dict=False)[0]

        image = run()
        if torch.isnan(image).any() and vae.dtype != torch.float32:
            warnings.append(f"The VAE produced NaNs (a black image) in {str(vae.dtype).replace('torch.', '')}; "
                            "the images were decoded again in fp32 and this VAE stays in fp32. Start with "
                            "--no-half-vae to skip the retry.")
            vae.to(torch.float32)
            image = run()
        return pipe.image_processor.postprocess(image.float(), output_type="pil")

    # ---- the job -------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, ctx: Any = None) -> GenerationResult:
        """Run ``request``; ``ctx`` is the job context (progress, preview, interrupt/skip)."""
        ctx = ctx or _NoContext()
        request.validate(self.settings)
        sampler, schedule = resolve_sampler(request.sampler_name, request.scheduler)
        seeds, subseeds = self.resolve_seeds(request)
        result = GenerationResult(request=request, job_id=ctx.job_id,
                                  job_timestamp=time.strftime("%Y%m%d%H%M%S"))
        with self.manager.acquire(request.checkpoint, request.vae) as loaded:
            result.model_name = loaded.info.model_name
            result.model_hash = loaded.info.short_hash or ""
            if loaded.vae_info is not None:
                result.vae_name = loaded.vae_info.name
                result.vae_hash = loaded.vae_info.short_hash or ""
            family = loaded.components.family
            total = len(seeds)
            for batch in range(request.n_iter):
                if ctx.interrupted:
                    break
                lo, hi = batch * request.batch_size, (batch + 1) * request.batch_size
                scheduler, sched_warnings = make_scheduler(sampler, schedule, loaded.components.scheduler_config)
                for w in sched_warnings:
                    if w not in result.warnings:
                        result.warnings.append(w)
                pipe = self.manager.pipeline(loaded, request.mode, scheduler)
                latents = self._run_pipeline(pipe, request, loaded, seeds[lo:hi], subseeds[lo:hi], ctx, lo, total,
                                             family)
                images = self.decode(pipe, latents, result.warnings)
                if ctx.skipped:
                    ctx.clear_skip()
                for i, image in enumerate(images):
                    self._finish_image(result, request, image, seeds[lo + i], subseeds[lo + i], loaded, sampler,
                                       schedule)
            result.interrupted = bool(ctx.interrupted)
        return result

    def _run_pipeline(self, pipe: Any, request: GenerationRequest, loaded: Loaded, seeds: list[int],
                      subseeds: list[int], ctx: Any, first_index: int, total: int, family: str) -> torch.Tensor:
        every = self.settings.preview_every

        def on_step_end(p: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            ctx.set_progress(step + 1, request.steps, image_index=first_index, images=total)
            if every and (step + 1) % every == 0 and step + 1 < request.steps:
                from .preview import latents_to_preview
                ctx.set_preview(latents_to_preview(kwargs["latents"], family))
            if ctx.interrupted or ctx.skipped:
                p._interrupt = True  # diffusers skips the remaining steps and returns the current latents
            return kwargs

        call: dict[str, Any] = dict(
            **encode_for_pipeline(loaded.components, request.prompt, request.negative_prompt, request.clip_skip),
            num_inference_steps=request.steps, guidance_scale=request.cfg_scale, width=request.width,
            height=request.height, num_images_per_prompt=request.batch_size, generator=self._generators(seeds),
            output_type="latent", callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        if request.subseed_strength > 0:
            call["latents"] = self._variation_latents(request, loaded, seeds, subseeds)
        ctx.set_progress(0, request.steps, image_index=first_index, images=total)
        with torch.inference_mode():
            try:
                return pipe(**call).images
            except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
                raise StudioError(f"Out of device memory at {request.width}x{request.height}, batch size "
                                  f"{request.batch_size}.", fix="lower the size or batch size, or start with "
                                  "--medvram") from exc

    def _finish_image(self, result: GenerationResult, request: GenerationRequest, image: Any, seed: int,
                      subseed: int, loaded: Loaded, sampler: str, schedule: str) -> None:
        params = build_params(request.replace(sampler_name=sampler, scheduler=schedule), seed=seed, subseed=subseed,
                              model_name=loaded.info.model_name, model_hash=loaded.info.short_hash,
                              vae_name=loaded.vae_info.name if loaded.vae_info else None,
                              vae_hash=loaded.vae_info.short_hash if loaded.vae_info else None,
                              version=__version__, extra=dict(request.extra_infotext) or None)
        infotext = format_infotext(request.prompt, request.negative_prompt, params)
        result.images.append(image)
        result.seeds.append(seed)
        result.subseeds.append(subseed)
        result.prompts.append(request.prompt)
        result.negative_prompts.append(request.negative_prompt)
        result.infotexts.append(infotext)
        if request.save_images and self.settings.save_images:
            path = self.outputs.save(image, mode=request.mode, seed=seed, infotext=infotext)
            result.paths.append(str(path))
