"""``build_router(studio, auth=...)``: every A1111 route of this issue on one FastAPI router.

Generation goes through ``studio.submit`` (the queue the UI uses); the coroutine then waits for the job without
holding a thread, so progress polls and other requests stay fast however many generations are queued. Blocking
work (model switches, file scans, PNG encoding) runs in worker threads.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Depends, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import TypeAdapter, ValidationError

from ..errors import StudioError
from ..infotext import parse_infotext, read_infotext
from ..samplers import samplers_api, schedulers_api
from . import models as m
from .controlnet import register_controlnet
from .convert import check_rng, find_checkpoint, generation_response, inpainting_conditioning, rename_field, to_request
from .errors import StudioRoute, auth_dependency, normalise_credentials
from .imagedata import decode_image
from .img2img import img2img_request
from .merge import register_merge
from .networks import register_networks
from .onnx import register_onnx
from .a1111_options import OPTION_TYPES
from .options import OVERRIDE_CHECKPOINT_KEYS, OptionsStore, check_clip_skip, check_option, check_text
from .progress import (JobMeta, JobWaiter, PreviewCache, idle_progress, internal_progress, job_progress)
from .training import register_training

if TYPE_CHECKING:  # pragma: no cover
    from ..app import Studio

log = logging.getLogger(__name__)

ERROR_STATUSES = (401, 404, 409, 422, 500)
# PNG text keys that are not "items" (A1111 images.IGNORED_INFO_KEYS)
_IGNORED_INFO_KEYS = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
                      "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
                      "photoshop", "parameters"}


def build_router(studio: "Studio", *, auth: Any = None, cmd_flags: dict | None = None) -> APIRouter:
    """The API router. ``auth``: ``[(user, password), ...]`` (launch.py's ``--api-auth``) or ``"u:p,u2:p2"``;
    when given every route needs HTTP basic auth. ``cmd_flags``: launch.py's parsed flags (``vars(args)``) shown
    by ``/sdapi/v1/cmd-flags`` (anything named like a password is hidden)."""
    credentials = normalise_credentials(auth)
    dependencies = [Depends(auth_dependency(credentials))] if credentials else []
    router = APIRouter(route_class=StudioRoute, dependencies=dependencies,
                       responses={code: {"model": m.ErrorResponse} for code in ERROR_STATUSES})
    api = _Api(studio, cmd_flags or {}, bool(credentials))
    api.register(router)
    register_networks(router, studio)
    register_controlnet(router, studio)
    register_merge(router, studio)
    register_training(router, studio)
    register_onnx(router, studio)
    return router


class _Api:
    """The route functions and the little state they share (per router, never module-level)."""

    def __init__(self, studio: "Studio", cmd_flags: dict, has_auth: bool):
        self.studio = studio
        self.options = OptionsStore(studio.settings.data_dir)
        self.waiter = JobWaiter(studio.queue)
        self.meta = JobMeta()
        self.previews = PreviewCache()
        self.cmd_flags = cmd_flags
        self.has_auth = has_auth

    def register(self, r: APIRouter) -> None:
        tags = ["sdapi"]
        r.add_api_route("/sdapi/v1/txt2img", self.txt2img, methods=["POST"], response_model=m.TextToImageResponse,
                        tags=tags, summary="Text to image (through the shared job queue)")
        r.add_api_route("/sdapi/v1/img2img", self.img2img, methods=["POST"], response_model=m.ImageToImageResponse,
                        tags=tags, summary="Image to image; with a mask, inpaint (through the shared job queue)")
        r.add_api_route("/sdapi/v1/progress", self.progress, methods=["GET"], response_model=m.ProgressResponse,
                        tags=tags, summary="Progress of the running job")
        r.add_api_route("/sdapi/v1/progress/{task_id}", self.task_progress, methods=["GET"],
                        response_model=m.TaskProgressResponse, tags=tags,
                        summary="Progress of one job by id (force_task_id)")
        r.add_api_route("/internal/progress", self.internal_progress, methods=["POST"],
                        response_model=m.InternalProgressResponse, tags=["internal"],
                        summary="A1111's per-task progress (id_task = force_task_id)")
        r.add_api_route("/sdapi/v1/interrupt", self.interrupt, methods=["POST"], response_model=m.EmptyResponse,
                        tags=tags, summary="Stop the running job")
        r.add_api_route("/sdapi/v1/skip", self.skip, methods=["POST"], response_model=m.EmptyResponse, tags=tags,
                        summary="Skip the current image of the running job")
        r.add_api_route("/sdapi/v1/options", self.get_options, methods=["GET"], response_model=m.OptionsResponse,
                        tags=tags)
        r.add_api_route("/sdapi/v1/options", self.set_options, methods=["POST"], response_model=m.EmptyResponse,
                        tags=tags, summary="Set options; sd_model_checkpoint switches the model")
        r.add_api_route("/sdapi/v1/cmd-flags", self.get_cmd_flags, methods=["GET"], response_model=m.FlagsResponse,
                        tags=tags)
        r.add_api_route("/sdapi/v1/samplers", self.get_samplers, methods=["GET"],
                        response_model=list[m.SamplerItem], tags=tags)
        r.add_api_route("/sdapi/v1/schedulers", self.get_schedulers, methods=["GET"],
                        response_model=list[m.SchedulerItem], tags=tags)
        r.add_api_route("/sdapi/v1/sd-models", self.get_sd_models, methods=["GET"],
                        response_model=list[m.SDModelItem], tags=tags)
        r.add_api_route("/sdapi/v1/sd-vae", self.get_sd_vaes, methods=["GET"], response_model=list[m.SDVaeItem],
                        tags=tags)
        r.add_api_route("/sdapi/v1/memory", self.get_memory, methods=["GET"], response_model=m.MemoryResponse,
                        tags=tags)
        r.add_api_route("/sdapi/v1/scripts", self.get_scripts, methods=["GET"], response_model=m.ScriptsList,
                        tags=tags)
        r.add_api_route("/sdapi/v1/prompt-styles", self.get_prompt_styles, methods=["GET"],
                        response_model=list[m.PromptStyleItem], tags=tags)
        r.add_api_route("/sdapi/v1/refresh-checkpoints", self.refresh_checkpoints, methods=["POST"],
                        response_model=m.EmptyResponse, tags=tags)
        r.add_api_route("/sdapi/v1/refresh-vae", self.refresh_vae, methods=["POST"], response_model=m.EmptyResponse,
                        tags=tags)
        r.add_api_route("/sdapi/v1/unload-checkpoint", self.unload_checkpoint, methods=["POST"],
                        response_model=m.EmptyResponse, tags=tags)
        r.add_api_route("/sdapi/v1/reload-checkpoint", self.reload_checkpoint, methods=["POST"],
                        response_model=m.EmptyResponse, tags=tags)
        r.add_api_route("/sdapi/v1/interrogate", self.interrogate, methods=["POST"],
                        response_model=m.InterrogateResponse, tags=tags,
                        summary="Caption an image (BLIP from models/captioners; through the job queue)")
        r.add_api_route("/sdapi/v1/png-info", self.png_info, methods=["POST"], response_model=m.PNGInfoResponse,
                        tags=tags, summary="Read and parse the infotext of an image")

    # ---- generation ------------------------------------------------------------------------------------------
    async def txt2img(self, body: m.Txt2ImgRequest) -> dict:
        return await self._generate(body, to_request)

    async def img2img(self, body: m.Img2ImgRequest) -> dict:
        return await self._generate(body, img2img_request)

    async def _generate(self, body: Any, build: Any) -> dict:
        """Build the request (``build(body, studio, options)``), queue it, wait, answer like A1111."""
        studio = self.studio
        try:
            request, notes = await run_in_threadpool(build, body, studio, self.options)  # decodes images
            previous = studio.manager.current
            try:
                job = studio.submit(request, task_id=body.force_task_id or None)
            except ValueError as exc:  # the task id is taken by a queued or running job
                raise StudioError(str(exc), field="force_task_id", status=409,
                                  fix="use a new id for each request") from None
            except RuntimeError as exc:  # the queue is shut down
                raise StudioError(str(exc), status=503) from None
        except StudioError as exc:
            raise rename_field(exc)
        for note in notes:
            log.info("%s %s: %s", request.mode, job.id, note)
        self.meta.put(job.id, batch_size=request.batch_size)
        if (request.checkpoint and body.override_settings_restore_afterwards is not False and previous is not None
                and previous.title != request.checkpoint):
            self._restore_current_after(previous)
        await self.waiter.wait(job)
        if job.error is not None:
            if isinstance(job.error, StudioError):
                raise rename_field(job.error)
            raise job.error
        inpainting = inpainting_conditioning(studio, job.result)
        return await run_in_threadpool(generation_response, request, job.result, body, notes, inpainting)

    def _restore_current_after(self, previous: Any) -> None:
        """override_settings_restore_afterwards: the checkpoint that was current is current again after the job
        (only the pointer: both models stay cached, nothing is re-read)."""
        manager = self.studio.manager

        def restore(ctx: Any) -> None:
            manager.current = previous

        # transparent: jobs naming their checkpoint may batch past it (it only moves the pointer back)
        self.studio.queue.submit(restore, kind="restore-checkpoint", description="override_settings",
                                 transparent=True)

    # ---- progress --------------------------------------------------------------------------------------------
    async def progress(self, skip_current_image: bool = Query(False)) -> dict:
        job = self.studio.queue.current()
        if job is None:
            return idle_progress()
        return job_progress(job, self.meta.get(job.id), self.previews, skip_current_image=skip_current_image)

    async def task_progress(self, task_id: str, skip_current_image: bool = Query(False)) -> dict:
        job = self.studio.queue.get(task_id)
        if job is None:
            raise StudioError(f"No job with task id {task_id!r} is queued, running or recently finished.",
                              field="task_id", status=404, fix="pass the force_task_id you sent with the request")
        out = job_progress(job, self.meta.get(job.id), self.previews, skip_current_image=skip_current_image)
        out.update(task_id=job.id, status=job.state, queue_position=job.queue_position,
                   error=str(job.error) if job.error is not None else None)
        return out

    async def internal_progress(self, req: m.InternalProgressRequest) -> dict:
        job = self.studio.queue.get(req.id_task) if req.id_task else None
        return internal_progress(job, self.previews, req.id_live_preview, req.live_preview)

    async def interrupt(self) -> dict:
        self.studio.queue.interrupt()
        return {}

    async def skip(self) -> dict:
        self.studio.queue.skip()
        return {}

    # ---- options ---------------------------------------------------------------------------------------------
    def _current_info(self) -> Any:
        studio = self.studio
        if studio.manager.current is not None:
            return studio.manager.current
        wanted = studio.settings.default_checkpoint
        if wanted:
            try:
                return studio.registry.find_checkpoint(wanted)
            except StudioError:
                pass
        infos = studio.registry.checkpoints()
        return infos[0] if infos else None

    def get_options(self) -> dict:
        studio, settings = self.studio, self.studio.settings
        out = {
            "sd_vae": settings.default_vae or "Automatic", "CLIP_stop_at_last_layers": 1,
            "samples_save": bool(settings.save_images), "samples_format": "png",
            "outdir_txt2img_samples": str(studio.outputs.outdir / "txt2img-images"),
            "show_progress_every_n_steps": settings.preview_every, "live_previews_enable": settings.preview_every > 0,
            "randn_source": "CPU" if settings.rng == "cpu" else "GPU",
            **self.options.snapshot(),
        }
        info = self._current_info()
        if info is not None and info.kind == "file" and not info.sha256:
            try:
                studio.registry.ensure_hash(info)   # cached by path, mtime and size
            except OSError:
                pass
        out["sd_model_checkpoint"] = info.title if info is not None else None
        out["sd_checkpoint_hash"] = info.sha256 if info is not None else None
        return out

    async def set_options(self, req: dict[str, Any] = Body(..., examples=[{"sd_model_checkpoint": "model.safetensors",
                                                                           "CLIP_stop_at_last_layers": 2}])) -> dict:
        studio = self.studio
        known = self._option_types()
        values = {key: check_option(key, val, known) for key, val in req.items()}
        store: dict[str, Any] = {}
        checkpoint = None
        for key in OVERRIDE_CHECKPOINT_KEYS:
            values.pop(key, None)
        if req.get("sd_model_checkpoint") is not None:
            checkpoint = await run_in_threadpool(find_checkpoint, studio, req["sd_model_checkpoint"],
                                                 "sd_model_checkpoint")
        if "CLIP_stop_at_last_layers" in values:
            values["CLIP_stop_at_last_layers"] = check_clip_skip(values["CLIP_stop_at_last_layers"],
                                                                 "CLIP_stop_at_last_layers")
        if "randn_source" in values:
            values["randn_source"] = check_rng(values["randn_source"], "randn_source")
        if "sd_vae" in values:
            vae = check_text(values["sd_vae"], "sd_vae")
            if vae not in ("Automatic", "None"):
                try:
                    values["sd_vae"] = studio.registry.find_vae(vae).name
                except StudioError as exc:
                    exc.field = "sd_vae"
                    raise
        for key, val in values.items():   # typed options must stay readable by GET (its response model)
            spec = m.OptionsResponse.model_fields.get(key)
            if spec is not None and key not in ("CLIP_stop_at_last_layers", "sd_vae"):
                try:
                    values[key] = TypeAdapter(spec.annotation).validate_python(val)
                except ValidationError as exc:
                    raise StudioError(f"Option '{key}' has the wrong type: {exc.errors()[0]['msg']}.",
                                      field=key) from None
        store.update(values)
        if checkpoint is not None:
            await run_in_threadpool(studio.switch_checkpoint, checkpoint.title)
        if store:
            await run_in_threadpool(self.options.update, store)
        return {}

    def _option_types(self) -> dict[str, Any]:
        """Keys POST /options accepts -> the type of their default (None: any JSON value)."""
        known: dict[str, Any] = dict(OPTION_TYPES)
        known.update({key: None for key in self.options.snapshot() if key not in known})  # stored before
        settings, extensions = self.studio.settings, getattr(self.studio, "extensions", None)
        known.update({key: None for key in settings.extension_settings if key not in known})
        for _name, spec in (extensions.setting_specs() if extensions is not None else []):
            default = spec.default
            known.setdefault(spec.key, type(default) if isinstance(default, (bool, int, float, str, list)) else None)
        return known

    def get_cmd_flags(self) -> dict:
        s = self.studio.settings
        flags: dict[str, Any] = {
            "api": True, "nowebui": False, "listen": False, "port": None,
            "models_dir": s.models_dir, "ckpt_dir": str(s.ckpt_path), "vae_dir": str(s.vae_path),
            "lora_dir": str(s.lora_path), "embeddings_dir": str(s.embeddings_path),
            "controlnet_dir": str(s.controlnet_path), "data_dir": s.data_dir, "outdir": s.outdir,
            "ckpt": s.default_checkpoint or None, "device": s.device, "precision": s.precision,
            "no_half": s.precision == "fp32", "no_half_vae": s.no_half_vae, "medvram": s.offload == "medvram",
            "lowvram": s.offload == "lowvram", "xformers": s.xformers, "allow_download": s.allow_download,
        }
        for key, val in self.cmd_flags.items():
            if isinstance(val, (str, int, float, bool, type(None))):
                flags[key] = val
            elif isinstance(val, (list, tuple)):
                flags[key] = [str(v) for v in val]
        for key in list(flags):
            if "auth" in key or "password" in key or "token" in key:
                flags[key] = "(set)" if flags[key] else None
        flags["api_auth"] = "(set)" if self.has_auth else None
        return flags

    def get_samplers(self) -> list:
        return samplers_api()

    def get_schedulers(self) -> list:
        return schedulers_api()

    def get_sd_models(self) -> list:
        registry = self.studio.registry
        out = []
        for info in registry.checkpoints():
            registry.hash_later(info)  # hash and sha256 are null until the background hash is done
            yaml = info.sidecar_yaml
            out.append({"title": info.title, "model_name": info.model_name, "hash": info.short_hash,
                        "sha256": info.sha256, "filename": str(info.path), "config": str(yaml) if yaml else None})
        return out

    def get_sd_vaes(self) -> list:
        return [{"model_name": v.name, "filename": str(v.path)} for v in self.studio.registry.vaes()]

    def get_memory(self) -> dict:
        try:
            import psutil

            process = psutil.Process(os.getpid())
            rss = process.memory_info().rss
            total = psutil.virtual_memory().total
            ram = {"free": total - rss, "used": rss, "total": total}
        except Exception as exc:  # noqa: BLE001 - A1111 reports the error in place of the numbers
            ram = {"error": str(exc)}
        try:
            import torch

            if torch.cuda.is_available():
                device = self.studio.manager.device
                free, total = torch.cuda.mem_get_info(device)
                s = dict(torch.cuda.memory_stats(device))

                def pair(name: str) -> dict:
                    return {"current": s.get(f"{name}.all.current", 0), "peak": s.get(f"{name}.all.peak", 0)}

                cuda = {"system": {"free": free, "used": total - free, "total": total},
                        "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
                        "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
                        "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}
            else:
                cuda = {"error": "unavailable"}
        except Exception as exc:  # noqa: BLE001
            cuda = {"error": str(exc)}
        return {"ram": ram, "cuda": cuda}

    async def get_scripts(self) -> dict:
        return {"txt2img": [], "img2img": []}

    async def get_prompt_styles(self) -> list:
        return []

    def refresh_checkpoints(self) -> dict:
        self.studio.registry.refresh()
        return {}

    def refresh_vae(self) -> dict:
        self.studio.registry.refresh_vaes()
        return {}

    def unload_checkpoint(self) -> dict:
        """Drop the loaded models (in the queue, so a running job keeps its model until it ends)."""
        self.studio.run_exclusive(self.studio.manager.unload_all, kind="unload")
        return {}

    def reload_checkpoint(self) -> dict:
        """Load the current checkpoint again (after unload-checkpoint), through the queue."""
        info = self._current_info()
        if info is None:
            raise StudioError(f"No checkpoint found in {self.studio.settings.ckpt_path}.",
                              field="sd_model_checkpoint", status=404,
                              fix="drop a .safetensors checkpoint there and POST /sdapi/v1/refresh-checkpoints")
        self.studio.switch_checkpoint(info.title if info.kind != "hub" else info.name)
        return {}

    async def interrogate(self, req: m.InterrogateRequest) -> dict:
        from ..interrogate import submit_interrogate
        image = decode_image(req.image, "image", self.studio.settings.max_image_pixels)
        try:
            job = submit_interrogate(self.studio, image, req.model)
        except RuntimeError as exc:  # the queue is shut down
            raise StudioError(str(exc), status=503) from None
        caption = await run_in_threadpool(job.wait)
        if caption is None:
            raise StudioError("The interrogation was interrupted.", status=409)
        return {"caption": caption}

    def png_info(self, req: m.PNGInfoRequest) -> dict:
        image = decode_image(req.image, "image", self.studio.settings.max_image_pixels)
        with image:
            text = read_infotext(image) or ""
            items = {}
            for key, val in (getattr(image, "info", {}) or {}).items():
                if not isinstance(key, str) or key in _IGNORED_INFO_KEYS:
                    continue
                if isinstance(val, bytes):
                    val = val.decode("utf-8", errors="replace")
                items[key] = val if isinstance(val, (str, int, float, bool)) else str(val)
        return {"info": text, "items": items, "parameters": parse_infotext(text)}
