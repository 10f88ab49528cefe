"""One batch of one job: the pipeline calls for txt2img, img2img / inpaint, the hires pass and ControlNet.

Split from engine.py, which owns the job as a whole (seeds, models, networks, infotext, saving).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import numpy as np
from PIL import Image

from . import deepcache, oom
from . import vae_codec
from .img2img import Prepared
from .lazy import torch
from .manager import Loaded
from .prompt_parser import extract_extra_networks
from .preview import LivePreview
from .prompts import Conditioning
from .request import MASKED_CONTENT, GenerationRequest, GenerationResult


class BatchRun:
    """One batch of one job: the pipeline calls for its mode and the hires pass."""

    # engine: the Engine running this job (not imported: engine.py imports this module)
    def __init__(self, engine: Any, request: GenerationRequest, loaded: Loaded, ctx: Any, seeds: list[int],
                 subseeds: list[int], first_index: int, total: int, result: GenerationResult,
                 control: list | None = None):
        self.e, self.r, self.loaded, self.ctx = engine, request, loaded, ctx
        self.control = control or []
        self.seeds, self.subseeds, self.first, self.total = seeds, subseeds, first_index, total
        self.result = result
        self.infotext: dict = dict(request.extra_infotext)
        if loaded.components.spec.distilled_guidance and getattr(loaded.components.unet.config, "guidance_embeds",
                                                                   False):
            self.infotext["Distilled CFG Scale"] = request.distilled_cfg_scale   # as Forge writes it
        self.steps_done: dict[str, tuple[int, int]] = {}   # phase -> (steps run, steps the sampler meant to run)
        # images per prompt row: a group of jobs (studio/grouped.py) gives one row per image instead
        self.per_prompt = request.batch_size

    def _scheduler(self, sampler: str, schedule: str) -> Any:
        comps = self.loaded.components
        scheduler, warns = comps.spec.make_scheduler(sampler, schedule, comps)
        self.result.warnings.extend(w for w in warns if w not in self.result.warnings)
        return scheduler

    def _call(self, pipe: Any, conds: Any, steps: int, phase: str = "", **kw: Any) -> torch.Tensor:
        """Run ``pipe`` with progress, live preview and interrupt/skip; returns latents."""
        ctx, every, comps = self.ctx, self.e.settings.preview_every, self.loaded.components
        spec = comps.spec
        # one preview per job: a group's context names where each of its jobs' rows start
        previews = [(LivePreview(c.set_preview, comps.family), lo) for c, lo in getattr(ctx, "rows", [(ctx, 0)])]
        watch = getattr(ctx, "watch", None)   # a group keeps the latents of a member stopped at this step
        height, width = self._size(kw, phase)
        batch = len(self.seeds)

        steps_of: dict = {}       # the DeepCache state of this pass, told each finished step

        def on_step_end(p: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            if steps_of.get("cache") is not None:
                steps_of["cache"].step = step + 1
            n = getattr(p, "_num_timesteps", None) or steps
            self.steps_done[phase] = (step + 1, n)
            ctx.set_progress(step + 1, n, image_index=self.first, images=self.total, textinfo=phase or None,
                             batch=batch)
            if watch is not None:
                watch(step + 1, lambda: spec.unpack_latents(kwargs["latents"], height, width))
            if every and (step + 1) % every == 0 and step + 1 < n:
                unpacked = spec.unpack_latents(kwargs["latents"], height, width)
                for preview, lo in previews:
                    preview.send(unpacked[lo:])
            ext = self.e.extensions
            if ext is not None and ext.has("studio_on_step"):
                from .extension_api import StepContext
                sc = StepContext(step + 1, n, kwargs["latents"], self.r, getattr(ctx, "job_id", ""))
                ext.call("studio_on_step", step=sc)
                if sc._stop:  # the extension ends the job like the Interrupt button does
                    ctx.stopped_by_extension = True
                    job = getattr(ctx, "job", None)
                    if job is not None:
                        job.interrupt()
            if ctx.interrupted or ctx.skipped or getattr(ctx, "stopped_by_extension", False):
                p._interrupt = True  # diffusers skips the remaining steps and returns the current latents
            return {**kwargs, **cond.update(step + 1, kwargs, self.r.batch_size)}

        # the schedule ([a:b:0.5], [a|b]) runs over the steps the sampler really takes (img2img: steps × strength)
        strength = kw.get("strength", 1.0)
        actual = max(1, int(steps * strength)) if "image" in kw and strength < 1 else steps
        cond: Conditioning = conds(actual)
        inputs = ["latents"]
        if cond.scheduled:   # what this pipeline lets a step callback swap
            inputs += [k for k in ("prompt_embeds", "add_text_embeds") if k in pipe._callback_tensor_inputs]
        if self.control:
            pipe, control_kw = self._with_control(pipe, kw, phase)
            kw = {**kw, **control_kw}
        ctx.set_progress(0, steps, image_index=self.first, images=self.total, textinfo=phase or None, batch=batch)
        self.steps_done[phase] = (0, actual)
        call = dict(spec.text_kwargs(cond.kwargs()), num_inference_steps=steps,
                    **spec.guidance_kwargs(self.r, comps),
                    num_images_per_prompt=self.per_prompt, generator=self.e._generators(self.seeds, self.r),
                    output_type="latent", callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=inputs, **kw)
        accepted = inspect.signature(pipe.__call__).parameters
        if "negative_prompt_embeds" not in accepted:
            # a pipeline without a negative prompt (FLUX Fill): no real CFG either
            if self.r.cfg_scale > 1 and "true_cfg_scale" in call:
                self._warn("This checkpoint's pipeline takes no negative prompt: CFG Scale above 1 and the negative "
                           "prompt are ignored.")
            call = {k: v for k, v in call.items() if k in accepted}
        with torch.inference_mode(), self._feature_cache(comps.unet, actual) as feature_cache:
            steps_of["cache"] = feature_cache
            try:
                return spec.unpack_latents(pipe(**call).images, height, width)
            except torch.cuda.OutOfMemoryError as exc:
                # the frames below hold the activations that filled the card: release them before anything else
                oom.drop_frames(exc)
                raise oom.OutOfMemory(oom.message(self.r)) from None

    def _feature_cache(self, denoiser: Any, steps: int) -> Any:
        """DeepCache around one pass when the setting asks for it and the model and options allow it."""
        interval = self.e.settings.deepcache_interval
        if interval <= 1:
            return contextlib.nullcontext()
        if not deepcache.supports(denoiser):
            self._warn("DeepCache works on UNet models only; this pass ran without it.")
        elif self.e.manager.offloading:
            self._warn("DeepCache is not used with --medvram / --lowvram (their hooks move whole modules); this "
                       "pass ran without it.")
        elif self.control:
            self._warn("DeepCache is not used with ControlNet (its residuals enter the deep blocks every step); "
                       "this pass ran without it.")
        else:
            start = self.e.settings.deepcache_start
            self.infotext["DeepCache"] = interval
            self.infotext["DeepCache start"] = start
            return deepcache.deep_cache(denoiser, interval, round(steps * start))
        return contextlib.nullcontext()

    def _size(self, kw: dict, phase: str) -> tuple[int, int]:
        """(height, width) in pixels of what this pass makes (packed latents are unpacked to it)."""
        if phase == "Hires fix":
            w, h = self.r.hr_size
            return h, w
        image = kw.get("image")
        if isinstance(image, torch.Tensor) and "height" not in kw:
            return image.shape[-2] * 8, image.shape[-1] * 8
        return kw.get("height", self.r.height), kw.get("width", self.r.width)

    def _with_control(self, pipe: Any, kw: dict, phase: str) -> tuple[Any, dict]:
        """Swap in the ControlNet pipeline view for this pass and prepare the control images at its size."""
        from .controlnet import infotext_params, prepare_control_image
        from .controlnet.apply import build_plan, controlnet_pipeline

        comps = self.loaded.components
        w, h = kw.get("width", self.r.width), kw.get("height", self.r.height)
        if phase == "Hires fix":
            w, h = self.r.hr_size
        init = self.r.init_images[0] if self.r.init_images else None
        fallback = init if init is None or hasattr(init, "size") else None
        units = [u for u, _ in self.control]
        prepared = [prepare_control_image(u, w, h, self.e.preprocessors, self.e.settings.annotators_path,
                                          fallback_image=fallback) for u in units]
        plan = build_plan(units, [n for _, n in self.control], [p.image for p in prepared], width=w, height=h,
                          guidance_scale=self.r.cfg_scale)
        mode = "inpaint" if comps.is_inpaint or "mask_image" in kw else ("img2img" if "image" in kw else "txt2img")
        cpipe = controlnet_pipeline(mode, comps.family, pipe.components, plan.controlnet)
        self.e.manager._apply_device_options(cpipe)
        self.infotext.update({k: v for k, v in infotext_params(plan.units).items()})
        if not phase:
            self.detected_maps = [(u, p.detected_map) for u, p in zip(units, prepared)]
        extra = plan.call_kwargs(mode)
        accepted = inspect.signature(cpipe.__call__).parameters
        if "masked_image_latents" in kw and "masked_image_latents" not in accepted:
            # diffusers' ControlNet inpaint pipelines take no masked latents: they mask the pixels and encode them
            # with this method, pointed at our encoder (the VAE's dtype, not the prompt's; no force_upcast)
            kw.pop("masked_image_latents")
            if isinstance(kw.get("image"), torch.Tensor) and getattr(self, "pixels", None) is not None:
                kw["image"] = self.pixels
            cpipe._encode_vae_image = lambda image, generator=None: vae_codec.encode_pixels(
                cpipe, image, self.result.warnings).to(image.dtype)
        for key in [k for k in kw if k not in accepted]:
            self.result.warnings.append(f"ControlNet with {mode}: option {key!r} is not supported and was left out.")
            kw.pop(key)
        return cpipe, extra

    def record_steps_done(self) -> None:
        """After an interrupt or skip, the infotext gives the steps that ran, not the ones asked for.

        img2img passes run steps × strength sampler steps, so the written count is the one that would run as many.
        """
        r = self.r
        for phase, (done, planned) in self.steps_done.items():
            if done >= planned:
                continue
            hires = phase == "Hires fix"
            strength = r.hr_denoising_strength if hires else (1.0 if r.mode == "txt2img" else r.denoising_strength)
            asked = (r.hr_second_pass_steps or r.steps) if hires else r.steps
            steps = done if strength >= 1 else min(asked, math.ceil(done / strength))
            self.infotext["Hires steps" if hires else "Steps"] = steps

    def txt2img(self, conds: Any, sampler: str, schedule: str) -> list[Image.Image] | torch.Tensor:
        r = self.r
        pipe = self.e.manager.pipeline(self.loaded, "txt2img", self._scheduler(sampler, schedule))
        kw: dict[str, Any] = dict(width=r.width, height=r.height)
        if r.subseed_strength > 0:
            kw["latents"] = self.loaded.components.spec.pack_latents(
                self.e._variation_latents(r, self.loaded, self.seeds, self.subseeds))
        if self.loaded.components.is_inpaint:  # an inpainting model draws from nothing through a full mask
            # at strength 1 the pipeline never encodes this image: only the masked image's latents count
            kw.update(image=Image.new("RGB", (r.width, r.height), (127, 127, 127)),
                      mask_image=Image.new("L", (r.width, r.height), 255), strength=1.0)
            if not self._pixel_inpaint:
                kw["masked_image_latents"] = self._masked_latents(pipe, None, None, r.width, r.height)
        latents = self._call(pipe, conds, r.steps, **kw)
        self.pipe = pipe
        if r.enable_hr:
            return latents  # the hires pass decides how to upscale
        if hasattr(self.ctx, "keep_stopped"):   # a group: members stopped early keep the latents they had then
            latents = self.ctx.keep_stopped(latents)
        return self.e.decode(pipe, latents, self.result.warnings)

    def hires(self, first: torch.Tensor, upscaler: Any, hr_sampler: tuple[str, str], conds: Any) -> list:
        r = self.r
        w, h = r.hr_size
        steps = r.hr_second_pass_steps or r.steps
        self.infotext.update({"Denoising strength": r.hr_denoising_strength})
        if r.hr_resize_x or r.hr_resize_y:
            self.infotext["Hires resize"] = f"{w}x{h}"
        else:
            self.infotext["Hires upscale"] = r.hr_scale
        if r.hr_second_pass_steps:
            self.infotext["Hires steps"] = r.hr_second_pass_steps
        self.infotext["Hires upscaler"] = upscaler.name
        if r.hr_sampler_name:
            self.infotext["Hires sampler"] = hr_sampler[0]
        if r.hr_prompt:
            self.infotext["Hires prompt"] = r.hr_prompt
            first_pass = conds

            def conds(steps: int) -> Conditioning:  # noqa: F811 - the second pass has its own prompt
                return first_pass(steps, extract_extra_networks(r.hr_prompt)[0],
                                  extract_extra_networks(r.hr_negative_prompt or r.negative_prompt)[0])
        if upscaler.is_latent:
            image: Any = self.e.upscalers.latent(upscaler, first, w, h)
        else:
            decoded = self.e.decode(self.pipe, first, self.result.warnings)
            image = [upscaler.fn(img, w, h) for img in decoded]
        if r.hr_denoising_strength <= 0 or steps * r.hr_denoising_strength < 1:
            return image if isinstance(image, list) else self.e.decode(self.pipe, image, self.result.warnings)
        pipe = self.e.manager.pipeline(self.loaded, "img2img", self._scheduler(*hr_sampler))
        if self._pixel_inpaint:       # the pipeline encodes the upscaled picture itself
            if isinstance(image, torch.Tensor):
                image = self.e.decode(self.pipe, image, self.result.warnings)
            kw = dict(image=image, mask_image=Image.new("L", (w, h), 255), width=w, height=h,
                      strength=r.hr_denoising_strength)
            latents = self._call(pipe, conds, steps, phase="Hires fix", **kw)
            return self.e.decode(pipe, latents, self.result.warnings)
        self.pixels = None if isinstance(image, torch.Tensor) else image
        z = image if isinstance(image, torch.Tensor) else self.e.encode(pipe, image, self.result.warnings)
        kw: dict[str, Any] = dict(image=self._unet_dtype(z), strength=r.hr_denoising_strength)
        if self.loaded.components.is_inpaint:
            kw.update(mask_image=Image.new("L", (w, h), 255), width=w, height=h,
                      masked_image_latents=self._masked_latents(pipe, None, None, w, h))
        self._sized(pipe, kw, w, h)
        latents = self._call(pipe, conds, steps, phase="Hires fix", **kw)
        return self.e.decode(pipe, latents, self.result.warnings)

    def img2img(self, prep: Prepared, conds: Any, sampler: str, schedule: str) -> list[Image.Image]:
        r, comps = self.r, self.loaded.components
        self.infotext.update(prep.infotext)
        mode = "inpaint" if r.mode == "inpaint" else "img2img"
        pipe = self.e.manager.pipeline(self.loaded, mode, self._scheduler(sampler, schedule))
        inpaint = mode == "inpaint" or comps.is_inpaint
        self.pixels = prep.init
        size = dict(height=r.height, width=r.width) if inpaint else {}  # as the inpaint pipeline resizes
        denoises = r.denoising_strength > 0 and r.steps * r.denoising_strength >= 1
        if self._pixel_inpaint and denoises:
            # the pipeline masks and encodes the init picture itself
            if mode == "inpaint" and MASKED_CONTENT[r.inpainting_fill] in ("latent noise", "latent nothing"):
                self._warn(f"Masked content '{MASKED_CONTENT[r.inpainting_fill]}' does not apply to this inpainting "
                           "checkpoint (it sees the masked picture itself): used 'original'.")
            mask = prep.mask if prep.mask is not None else Image.new("L", (r.width, r.height), 255)
            kw = dict(image=prep.init, strength=r.denoising_strength, width=r.width, height=r.height, mask_image=mask)
            latents = self._call(pipe, conds, r.steps, **kw)
            return [prep.finish(im) for im in self.e.decode(pipe, latents, self.result.warnings)]
        if prep.latent_source is not None:
            latents = self.e.encode(pipe, prep.latent_source, self.result.warnings)
            z = torch.nn.functional.interpolate(latents, size=(r.height // 8, r.width // 8), mode="bilinear")
        else:
            z = vae_codec.encode(pipe, prep.init, self.result.warnings, **size)
        if not denoises:
            # nothing to denoise: the init image goes through the VAE and back, as a 0-step sampler would
            images = self.e.decode(pipe, z.repeat(r.batch_size, 1, 1, 1), self.result.warnings)
            return [prep.finish(im) for im in images]
        kw: dict[str, Any] = dict(image=z, strength=r.denoising_strength)
        mask = prep.mask
        if inpaint:
            if mask is None:
                mask = Image.new("L", (r.width, r.height), 255)
            kw.update(mask_image=mask, width=r.width, height=r.height)
            content = MASKED_CONTENT[r.inpainting_fill] if mode == "inpaint" else "original"
            if content in ("latent noise", "latent nothing"):
                kw["image"] = self._latent_content(z, mask, content)
            # given latents, the pipeline cannot mask the image itself; only a 9-channel UNet reads these (a
            # 4-channel one gets the init latents, which it ignores, so that no pixels are masked as latents)
            kw["masked_image_latents"] = (self._masked_latents(pipe, prep.init, mask, r.width, r.height)
                                          if comps.is_inpaint else z)
        self._sized(pipe, kw, r.width, r.height)
        kw["image"] = self._unet_dtype(kw["image"])
        if "masked_image_latents" in kw:
            kw["masked_image_latents"] = self._unet_dtype(kw["masked_image_latents"])
        latents = self._call(pipe, conds, r.steps, **kw)
        return [prep.finish(im) for im in self.e.decode(pipe, latents, self.result.warnings)]

    @property
    def _pixel_inpaint(self) -> bool:
        comps = self.loaded.components
        return comps.spec.inpaint_from_pixels(comps.in_channels)

    def _warn(self, text: str) -> None:
        if text not in self.result.warnings:
            self.result.warnings.append(text)

    @staticmethod
    def _sized(pipe: Any, kw: dict, width: int, height: int) -> None:
        """Pipelines that take a size with latents as the image (FLUX's default to 1024² otherwise) get it."""
        if "height" not in kw and "height" in inspect.signature(pipe.__call__).parameters:
            kw.update(height=height, width=width)

    def _unet_dtype(self, z: torch.Tensor) -> torch.Tensor:
        """Latents we encoded (VAE dtype) as the pipeline gets them: it never runs the VAE on them."""
        return z.to(self.loaded.components.unet.dtype)

    def _latent_content(self, z: torch.Tensor, mask: Image.Image, content: str) -> torch.Tensor:
        """A1111's latent noise / latent nothing: the masked area of the init latents is noise or zeros."""
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
        m = torch.nn.functional.interpolate(m, size=z.shape[-2:]).to(z) >= 0.5
        if content == "latent noise":
            gen = self.e._generators(self.seeds[:1], self.r)[0]
            fill = torch.randn(z.shape, generator=gen, device=gen.device).to(z)
        else:
            fill = torch.zeros_like(z)
        return torch.where(m, fill, z)

    def _masked_latents(self, pipe: Any, init: Image.Image | None, mask: Image.Image | None, width: int,
                        height: int) -> torch.Tensor:
        """Latents of the init image with the masked area blanked, which a 9-channel inpainting UNet is
        conditioned on (``init`` None: a full mask, so nothing of the image is left)."""
        if init is None:
            return vae_codec.encode_pixels(pipe, torch.zeros(1, 3, height, width), self.result.warnings)
        pixels = pipe.image_processor.preprocess(init, height=height, width=width)
        pm = pipe.mask_processor.preprocess(mask, height=height, width=width)
        return vae_codec.encode_pixels(pipe, pixels * (pm < 0.5), self.result.warnings)
