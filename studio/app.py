"""The Studio object: built once, it holds settings, registry, pipeline manager, job queue and engine."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from .errors import StudioError
from .hashes import HashCache
from .jobs import Job, JobQueue
from .outputs import OutputWriter
from .prompts import PromptEncoder
from .request import GenerationRequest, GenerationResult
from .samplers import resolve_sampler
from .settings import Settings

log = logging.getLogger(__name__)


class Studio:
    """Everything the UI tabs, the REST API and extensions share. No module-level state anywhere."""

    def __init__(self, settings: Settings, *, load_extensions: bool = True):
        from .engine import Engine
        from .manager import PipelineManager
        from .registry import Registry

        self.settings = settings.validate()
        self.hashes = HashCache(settings.cache_file)
        self.registry = Registry(settings, self.hashes)
        self.manager = PipelineManager(settings, self.registry)
        self.queue = JobQueue(batch_limit=lambda: self.settings.queue_batch)
        self.outputs = OutputWriter(settings.outdir)
        self.prompts = PromptEncoder()
        self._tokenizer = None
        self._imports = threading.Lock()  # diffusers' / transformers' lazy imports are not thread-safe
        from .adapters import EmbeddingLibrary, LoraLibrary
        self.loras = LoraLibrary(settings, self.hashes)
        self.embeddings = EmbeddingLibrary(settings, self.hashes)
        from .controlnet import ControlNetLibrary, default_preprocessors
        self.controlnets = ControlNetLibrary(settings, self.hashes)
        self.preprocessors = default_preprocessors(settings.annotators_path, device=self._annotator_device)
        from .extensions import ExtensionManager
        self.extensions = ExtensionManager([Path(settings.extensions_dir)],
                                           Path(settings.data_dir) / "extensions.json", self)
        self.engine = Engine(settings, self.manager, self.outputs, prompts=self.prompts, loras=self.loras,
                             embeddings=self.embeddings, extensions=self.extensions, controlnets=self.controlnets,
                             preprocessors=self.preprocessors)
        from .training import TrainingService  # torch-free until a run starts; the Train tab and API share it
        self.training = TrainingService(self)
        if load_extensions:
            self.load_extensions()

    def load_extensions(self) -> None:
        """Import enabled extensions and plug in what they add (upscalers, model-loaded listeners...)."""
        from .upscalers import Upscaler

        self.extensions.load_all()
        for name, spec in self.extensions.collect("studio_upscalers"):
            try:
                self.engine.upscalers.register(Upscaler(spec.name, fn=spec.fn))
            except (AttributeError, ValueError) as exc:
                self.extensions.record_error(name, "studio_upscalers", exc)
        from .controlnet import ParamSpec
        for name, spec in self.extensions.collect("studio_preprocessors"):
            try:
                params = [ParamSpec(p.name, p.label, p.minimum, p.maximum, p.default, p.step) for p in spec.params]
                self.preprocessors.register(spec.name, _adapt_preprocessor(spec.fn), params,
                                            resolution=spec.resolution, label=f"{spec.name} ({name})")
            except (AttributeError, TypeError, ValueError) as exc:
                self.extensions.record_error(name, "studio_preprocessors", exc)
        if self.extensions.has("studio_model_loaded"):
            from .extension_api import ModelInfo

            def announce(info, components) -> None:
                if info.kind != "hub":  # the hook promises the hash: wait for the background one (first load)
                    self.registry.ensure_hash(info)
                self.extensions.call("studio_model_loaded", model=ModelInfo(
                    info.name, info.title, components.family, info.short_hash or ""))

            self.manager.on_model_loaded.append(announce)

    def warm_up(self) -> None:
        """Import the ML stack (torch, diffusers, transformers: seconds) and resolve the device, as a job.

        Nothing built by ``__init__`` needs torch, so the server answers first and calls this afterwards. It runs
        in the job queue because diffusers' and transformers' lazy imports are not thread-safe: a generation or
        model load clicked meanwhile queues behind it, then runs as usual (the token counter waits on a lock).
        """
        def run() -> None:
            with self._imports:
                _import_ml_stack()
        self.run_exclusive(run, kind="warm-up")
        from . import devices

        dtype = self.manager.dtype  # resolves the device too (a --device / --precision that cannot work raises)
        log.info(devices.describe(self.settings, self.manager.device, dtype))
        warning = devices.cpu_build_warning(self.settings, self.manager.device)
        if warning:
            log.warning(warning)

    def _annotator_device(self) -> Any:
        """Where ControlNet annotator models run: the compute device unless the settings say the CPU."""
        return "cpu" if self.settings.annotator_device == "cpu" else self.manager.device

    def submit(self, request: GenerationRequest, *, task_id: str | None = None) -> Job:
        """Queue a generation; returns the Job at once (progress, preview, interrupt, wait)."""
        # bad fields fail here, before they take a place in the queue
        request.validate(self.settings)
        resolve_sampler(request.sampler_name, request.scheduler)
        from .dynamic_batch import batch_key, generate_group
        from .jobs import Batchable

        key = batch_key(request, self.extensions)
        batch = None if key is None else Batchable(key, request, lambda items: generate_group(self.engine, items),
                                                   size=request.batch_size)
        return self.queue.submit(lambda ctx: self.engine.generate(request, ctx), kind=request.mode,
                                 task_id=task_id, description=request.prompt[:80], batch=batch)

    def generate(self, request: GenerationRequest, *, timeout: float | None = None) -> GenerationResult:
        """Queue a generation and wait for its result."""
        return self.submit(request).wait(timeout)

    def count_tokens(self, text: str) -> int:
        """CLIP tokens of a prompt as A1111's counter counts them (BREAK closes a 75-token chunk)."""
        from .loading.tokenizers import load_clip_tokenizer
        from .prompt_parser import extract_extra_networks

        with self._imports:  # the token counter may run while warm_up imports transformers
            if self._tokenizer is None:  # the shipped tokenizer: counting works before any model is loaded
                self._tokenizer = load_clip_tokenizer()
        return self.prompts.count_tokens(self._tokenizer, extract_extra_networks(text)[0])[0]

    def run_exclusive(self, fn: Any, *, kind: str = "task") -> Any:
        """Run any device work (model switch, training start) in the queue, between generations."""
        return self.queue.run_sync(lambda ctx: fn(), kind=kind)

    def switch_checkpoint(self, name: str) -> str:
        """Load a checkpoint through the queue and make it current; returns its title."""
        return self.run_exclusive(lambda: self.manager.load(name).title, kind="load")

    def generation_defaults(self, checkpoint: str) -> dict | None:
        """The generation values (steps, CFG, sampler, size...) a checkpoint's family starts from, its variant's
        where the file tells (FLUX schnell: 4 steps) and its declared native size; never loads it. None when the
        family cannot be told before loading (a pickle, an unknown name)."""
        from . import families
        from .loading.peek import checkpoint_family
        try:
            info = self.registry.find_checkpoint(checkpoint)
        except StudioError:
            return None
        comps = self.manager.cached_components(info)
        if comps is not None:
            out = comps.spec.generation_defaults(comps)
        else:
            peeked = checkpoint_family(info.path, info.kind)
            if peeked is None:
                fam = families.get(info.family)     # known once it was loaded in this process
                if fam is None:
                    return None
                peeked = (fam, None)
            out = peeked[0].generation_defaults(shapes=peeked[1])
        native = info.native_size
        if native:
            out["width"], out["height"] = native
        return out

    def close(self) -> None:
        training = getattr(self, "training", None)
        if training is not None:
            training.stop()  # a running training saves its state and a usable LoRA, then ends with us
        self.queue.shutdown(wait=True)
        self.manager.unload_all()


def _import_ml_stack() -> None:
    import diffusers  # noqa: F401 - the imports are the point
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from .loading import diffusers_folder, hub, single_file  # noqa: F401


def _adapt_preprocessor(fn: Any) -> Any:
    """Extension preprocessors take (image, resolution, **params); the registry calls (image, res, params, model)."""
    return lambda image, resolution, params, model: fn(image, resolution, **dict(params))


__all__ = ["Studio", "StudioError", "GenerationRequest", "GenerationResult", "Settings"]
