"""Dynamic batching: compatible txt2img jobs waiting in the queue run as one pipeline call.

The queue (studio/jobs.py) groups jobs by the key :func:`batch_key` gives; :func:`generate_group` runs a group.
Each image keeps the noise of its own seed and the embeddings of its own prompt (one prompt row per image), so
what changes against running the jobs one by one is only the batch the UNet sees. Each job keeps its own
progress, preview, result, infotext and saved files; interrupting or skipping one keeps the latents it had at
that step for its pictures and lets the others run on.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Hashable

from . import oom
from .errors import JobInterrupted, StudioError
from .lazy import torch
from .onnx.runtime import for_job as onnx_for_job
from .passes import BatchRun
from .prompt_parser import extract_extra_networks
from .prompts import Conditioning
from .request import GenerationRequest, GenerationResult
from .samplers import resolve_sampler
from .speedups import job_options

# per-job fields: the rest of a request must be equal for two jobs to share a batch
_OWN_FIELDS = ("prompt", "negative_prompt", "seed", "subseed", "batch_size", "save_images")
# extension hooks that see or change one request at a time, so a job under them runs alone
_PER_REQUEST_HOOKS = ("studio_adjust_request", "studio_on_step")


def batch_key(request: GenerationRequest, extensions: Any = None) -> Hashable | None:
    """What two txt2img jobs must share to run as one batch, or None when this one runs alone.

    Only plain txt2img groups (no hires fix, ControlNet, variation seed or batch count): those add passes or
    per-job inputs a shared call cannot split. The LoRAs in the prompt are part of the key, the prompt is not.
    """
    if request.mode != "txt2img" or request.enable_hr or request.n_iter != 1 or request.subseed_strength > 0:
        return None
    if any(getattr(u, "enabled", False) for u in request.controlnet_units):
        return None
    if extensions is not None and any(extensions.has(h) for h in _PER_REQUEST_HOOKS):
        return None
    fields = request.to_dict()
    for name in _OWN_FIELDS:
        fields.pop(name)
    _, networks = extract_extra_networks(request.prompt)
    tags = tuple((n.kind, n.name, n.args) for n in networks)
    return tuple(sorted(fields.items())) + (("networks", tags),)


class GroupContext:
    """The job context one pipeline call of a group sees: it reports to every member's own context.

    ``rows`` says where each member's images start (one preview each); ``watch`` keeps a member's latents at the
    step it was stopped; the call itself stops only once every member is stopped.
    """

    job_id = ""
    skipped = False

    def __init__(self, members: list[tuple[Any, int, int]]):
        self.members = members                   # (ctx, first row, end row)
        self.rows = [(ctx, lo) for ctx, lo, _ in members]
        self.stopped: dict[int, tuple[int, torch.Tensor]] = {}   # member -> (steps done, its latents then)

    @staticmethod
    def _stops(ctx: Any) -> bool:
        return bool(ctx.interrupted or ctx.skipped)

    @property
    def interrupted(self) -> bool:
        return all(i in self.stopped or self._stops(c) for i, (c, _, _) in enumerate(self.members))

    def check(self) -> None:
        if self.interrupted:
            raise JobInterrupted("Every job of the batch was interrupted.")

    def clear_skip(self) -> None:
        for ctx, _, _ in self.members:
            ctx.clear_skip()

    def set_progress(self, step: int, steps: int, image_index: int | None = None, images: int | None = None,
                     textinfo: str | None = None, batch: int | None = None) -> None:
        for i, (ctx, lo, hi) in enumerate(self.members):
            if i not in self.stopped:
                ctx.set_progress(step, steps, image_index=0, images=hi - lo, textinfo=textinfo, batch=hi - lo)

    def set_preview(self, obj: Any) -> None:
        """Previews go to each member by ``rows``; nothing is sent for the group as a whole."""

    def watch(self, step: int, latents: Callable[[], torch.Tensor]) -> None:
        """After each step: a member stopped since keeps its rows of the latents as they are now."""
        fresh = [i for i, (c, _, _) in enumerate(self.members) if i not in self.stopped and self._stops(c)]
        if fresh:
            current = latents()
            for i in fresh:
                _, lo, hi = self.members[i]
                self.stopped[i] = (step, current[lo:hi].clone())

    def keep_stopped(self, latents: torch.Tensor) -> torch.Tensor:
        """The final latents with each stopped member's rows put back to where it stopped."""
        if not self.stopped:
            return latents
        latents = latents.clone()
        for i, (_, kept) in self.stopped.items():
            _, lo, hi = self.members[i]
            latents[lo:hi] = kept.to(latents)
        return latents


def generate_group(engine: Any, items: list[tuple[GenerationRequest, Any]]) -> list[Any]:
    """Run jobs of one batch key together; one outcome (result or exception) per job, in order.

    Out of device memory, the group runs again one job at a time (each with the engine's own OOM retry): a batch
    the card cannot hold must not fail jobs that fit alone.
    """
    if len(items) > 1:
        try:
            outcomes = _run_group(engine, items)
        except BaseException as exc:  # noqa: BLE001 - only OOMs fall back; anything else ends the whole group
            if not oom.is_oom(exc):
                raise
            oom.drop_frames(exc)
            outcomes = None
        if outcomes is not None:
            return outcomes
    return [_alone(engine, request, ctx) for request, ctx in items]


def _alone(engine: Any, request: GenerationRequest, ctx: Any) -> Any:
    try:
        return engine.generate(request, ctx)
    except BaseException as exc:  # noqa: BLE001 - one member's failure is that member's outcome
        return exc


def _run_group(engine: Any, items: list[tuple[GenerationRequest, Any]]) -> list[Any] | None:
    """The group as one pipeline call; None when its prompts cannot share one (then each runs alone)."""
    settings = engine.settings
    outcomes: list[Any] = [None] * len(items)
    for i, (request, _) in enumerate(items):
        try:
            request.validate(settings)
        except StudioError as exc:
            outcomes[i] = exc
    live = [i for i, o in enumerate(outcomes) if o is None]
    if not live:
        return outcomes
    first = items[live[0]][0]
    sampler, schedule = resolve_sampler(first.sampler_name, first.scheduler)
    stamp = time.strftime("%Y%m%d%H%M%S")
    seeds = {i: engine.resolve_seeds(items[i][0]) for i in live}
    results = {i: GenerationResult(request=items[i][0], job_id=items[i][1].job_id, job_timestamp=stamp)
               for i in live}
    with engine.manager.acquire(first.checkpoint, first.vae) as loaded, contextlib.ExitStack() as stack:
        engine._check_family(first, loaded)
        spec = loaded.components.spec
        lead = results[live[0]]
        if spec.ragged_text:
            return None    # each prompt keeps its own length: no common batch
        prompt_networks = extract_extra_networks(first.prompt)[1]
        shared: list[str] = []
        adapter_key, lora_hashes = engine._activate_networks(loaded, prompt_networks, shared)
        stack.enter_context(job_options(settings, loaded.components, loaded.vae, engine.manager.device,
                                        lead.warnings, engine.manager.offloading))
        onnx_infotext = stack.enter_context(onnx_for_job(engine, first, loaded, prompt_networks, shared))
        embeddings = engine._embeddings(loaded)
        conds: dict[int, Conditioning] = {}
        for i in list(live):
            request, ctx = items[i]
            try:
                conds[i] = engine.prompts.encode(
                    loaded.components, extract_extra_networks(request.prompt)[0],
                    extract_extra_networks(request.negative_prompt)[0], steps=request.steps,
                    clip_skip=request.clip_skip, state_key=(loaded.key, adapter_key), embeddings=embeddings,
                    check=getattr(ctx, "check", None), max_chunks=settings.max_prompt_chunks)
            except (JobInterrupted, StudioError) as exc:
                if isinstance(exc, JobInterrupted):
                    results[i].interrupted = True
                    exc.result = results[i]
                outcomes[i] = exc
                live.remove(i)
        if not live:
            return outcomes
        sizes = [items[i][0].batch_size for i in live]
        stacked = Conditioning.stack([conds[i] for i in live], sizes)
        if stacked is None:
            return None    # a prompt schedule or another chunk count: these jobs run one by one
        members, lo = [], 0
        for i, n in zip(live, sizes):
            members.append((items[i][1], lo, lo + n))
            lo += n
        group = GroupContext(members)
        merged = first.replace(batch_size=lo)
        all_seeds = [s for i in live for s in seeds[i][0]]
        all_subseeds = [s for i in live for s in seeds[i][1]]
        run = BatchRun(engine, merged, loaded, group, all_seeds, all_subseeds, 0, lo, lead, [])
        run.per_prompt = 1     # the stacked embeddings hold one row per image already
        run.infotext.update(onnx_infotext)     # where the engine puts it, so the infotext is the one of a lone job
        images = run.txt2img(lambda steps, *_: stacked, sampler, schedule)
        infotext = dict(run.infotext)
        if lora_hashes:
            infotext["Lora hashes"] = lora_hashes
        warnings = shared + [w for w in lead.warnings if w not in shared]
        for k, i in enumerate(live):
            request, ctx = items[i]
            result = results[i]
            result.warnings = list(warnings)
            result.model_name, result.model_hash = loaded.info.model_name, loaded.info.short_hash or ""
            if loaded.vae_info is not None:
                result.vae_name, result.vae_hash = loaded.vae_info.name, loaded.vae_info.short_hash or ""
            own = dict(infotext)
            if k in group.stopped:           # it ran the steps up to its interrupt, as a job alone would say
                own["Steps"] = group.stopped[k][0]
            used = conds[i].embeddings_used
            if used and engine.embeddings is not None:
                pairs = [(n, engine.embeddings.hash(n)) for n in sorted(used)]
                own["TI hashes"] = engine.loras.infotext_hashes([p for p in pairs if p[1]])
            _, start, end = members[k]
            job_seeds, job_subseeds = seeds[i]
            for j, image in enumerate(images[start:end]):
                engine._finish_image(result, request, image, job_seeds[j], job_subseeds[j], loaded, sampler,
                                     schedule, own, all_seeds=job_seeds)
            result.interrupted = bool(ctx.interrupted)
            if ctx.skipped:
                ctx.clear_skip()
            outcomes[i] = result
    return outcomes
