"""The Studio object: built once, it holds settings, registry, pipeline manager, job queue and engine."""
from __future__ import annotations

import logging
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

    def __init__(self, settings: Settings):
        from .engine import Engine
        from .manager import PipelineManager
        from .registry import Registry

        self.settings = settings.validate()
        self.hashes = HashCache(settings.cache_file)
        self.registry = Registry(settings, self.hashes)
        self.manager = PipelineManager(settings, self.registry)
        self.queue = JobQueue()
        self.outputs = OutputWriter(settings.outdir)
        self.prompts = PromptEncoder()
        self._tokenizer = None
        from .adapters import EmbeddingLibrary, LoraLibrary
        self.loras = LoraLibrary(settings, self.hashes)
        self.embeddings = EmbeddingLibrary(settings, self.hashes)
        self.engine = Engine(settings, self.manager, self.outputs, prompts=self.prompts, loras=self.loras,
                             embeddings=self.embeddings)

    def submit(self, request: GenerationRequest, *, task_id: str | None = None) -> Job:
        """Queue a generation; returns the Job at once (progress, preview, interrupt, wait)."""
        # bad fields fail here, before they take a place in the queue
        request.validate(self.settings)
        resolve_sampler(request.sampler_name, request.scheduler)
        return self.queue.submit(lambda ctx: self.engine.generate(request, ctx), kind=request.mode,
                                 task_id=task_id, description=request.prompt[:80])

    def generate(self, request: GenerationRequest, *, timeout: float | None = None) -> GenerationResult:
        """Queue a generation and wait for its result."""
        return self.submit(request).wait(timeout)

    def count_tokens(self, text: str) -> int:
        """CLIP tokens of a prompt as A1111's counter counts them (BREAK closes a 75-token chunk)."""
        from .loading.tokenizers import load_clip_tokenizer
        from .prompt_parser import extract_extra_networks

        if self._tokenizer is None:  # the shipped tokenizer: counting works before any model is loaded
            self._tokenizer = load_clip_tokenizer()
        return self.prompts.count_tokens(self._tokenizer, extract_extra_networks(text)[0])[0]

    def run_exclusive(self, fn: Any, *, kind: str = "task") -> Any:
        """Run any device work (model switch, training start) in the queue, between generations."""
        return self.queue.run_sync(lambda ctx: fn(), kind=kind)

    def switch_checkpoint(self, name: str) -> str:
        """Load a checkpoint through the queue and make it current; returns its title."""
        return self.run_exclusive(lambda: self.manager.load(name).title, kind="load")

    def close(self) -> None:
        self.queue.shutdown(wait=True)
        self.manager.unload_all()


__all__ = ["Studio", "StudioError", "GenerationRequest", "GenerationResult", "Settings"]
