"""The PipelineManager: checkpoints loaded once, kept under byte budgets, shared by every mode.

Two tiers (device, RAM) with least-recently-used eviction; a model held by a running job is locked and never
evicted. On a CPU-only machine the device tier *is* RAM, so there is a single tier. Pipelines for a mode are
built per call as views over the same module objects: constructing one costs microseconds and copies nothing.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import devices, offload
from .errors import ModelLoadError, StudioError
from .lazy import torch
from .loading.components import Components
from .registry import CheckpointInfo, Registry, VaeInfo
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One cached model (checkpoint components or a VAE)."""

    key: tuple
    label: str
    value: Any                       # Components or a VAE module
    nbytes: int
    tier: str                        # "device" or "cpu"
    locks: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Loaded:
    """What ``acquire`` hands a job: the components and the checkpoint they came from."""

    info: CheckpointInfo
    components: Components
    key: tuple
    vae: Any = None                  # the VAE to use (the checkpoint's own or a chosen one)
    vae_info: VaeInfo | None = None
    notes: list[str] = field(default_factory=list)


def _module_bytes(module: Any) -> int:
    from .quantize import module_bytes
    return module_bytes(module)


class PipelineManager:
    """Loads checkpoints and VAEs once and keeps them under the device and RAM budgets."""

    def __init__(self, settings: Settings, registry: Registry, *, loaders: dict[str, Callable] | None = None):
        self.settings = settings
        self.registry = registry
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._loaders = loaders or {}
        self.loads = 0               # how many times a file was actually read (tests and benchmarks look)
        self.current: CheckpointInfo | None = None
        self.on_model_loaded: list[Callable[[CheckpointInfo, Components], None]] = []
        self.probes: dict = {}       # one-time device checks (does xformers work here?)
        # RAM held beside the cached models by their owners, counted in the RAM tier: providers of [(label, bytes)]
        self.ram_extras: list[Callable[[], list[tuple[str, int]]]] = [self._lora_patch_bytes]

    # ---- device (resolved on first use: asking torch for CUDA imports it, and the server starts before torch)
    @functools.cached_property
    def device(self) -> torch.device:
        device = devices.resolve_device(self.settings)
        if self.settings.offload != "none" and device.type != "cuda":
            log.warning("--%s only changes anything on a CUDA device; on %s every model part is already in the "
                        "same memory, so it is ignored.", self.settings.offload, device)
        return device

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        return devices.resolve_dtype(self.settings, self.device)

    # Tests set this to run the offload code path (hooks, meta weights) with the CPU as execution device: there is
    # no GPU here, and on a CPU offloading is otherwise skipped.
    offload_on_cpu = False

    @property
    def offloading(self) -> bool:
        """With offloading, models rest on the CPU and accelerate's hooks move each part to the GPU when it runs."""
        return self.settings.offload != "none" and (self.device.type == "cuda" or self.offload_on_cpu)

    @property
    def execution_device(self) -> torch.device:
        """Where the models compute (inputs go here), also when offloading keeps their weights on the CPU."""
        return self.device

    @property
    def placement(self) -> torch.device:
        return torch.device("cpu") if self.offloading else self.device

    # ---- budgets ---------------------------------------------------------------------------------
    @property
    def single_tier(self) -> bool:
        """Every cached model rests in RAM: a CPU-only machine, or offloading (the GPU holds one part at a time)."""
        return self.placement.type == "cpu"

    def budget(self, tier: str) -> int:
        if not self.single_tier:
            return devices.device_budget(self.settings, self.device) if tier == "device" else \
                devices.ram_budget(self.settings)
        if self.offloading:  # the models rest in RAM, so RAM bounds them, not the card's memory
            return devices.ram_budget(self.settings)
        return min(devices.ram_budget(self.settings), devices.device_budget(self.settings, self.device))

    def used(self, tier: str) -> int:
        models = sum(e.nbytes for e in self._entries.values() if e.tier == tier)
        ram = "device" if self.single_tier else "cpu"
        return models + (sum(n for _, n in self.extras()) if tier == ram else 0)

    def extras(self) -> list[tuple[str, int]]:
        return [item for provider in list(self.ram_extras) for item in provider()]

    def _lora_patch_bytes(self) -> list[tuple[str, int]]:
        """LoRA originals and patched-set caches (CPU tensors) of the cached checkpoints."""
        from .adapters import held_bytes
        held = [(f"LoRA patches of {e.label}", held_bytes(e.value)) for e in list(self._entries.values())
                if isinstance(e.value, Components)]
        return [(label, n) for label, n in held if n]

    def ram_used(self) -> int:
        """Bytes of cached models in system RAM: the RAM tier, plus the device tier where it rests on the CPU
        (a CPU-only machine, or offloading, where diffusers' hooks move each part to the GPU as it runs)."""
        return self.used("cpu") + (self.used("device") if self.placement.type == "cpu" else 0)

    def stats(self) -> dict:
        if "device" not in self.__dict__ and "torch" not in sys.modules:  # the server is still starting
            budget = devices.ram_budget(self.settings)
            return {"device": f"{self.settings.device} (not resolved yet: torch is loading)",
                    "dtype": self.settings.precision, "entries": [], "device_used": 0, "device_budget": budget,
                    "ram_used": 0, "ram_budget": budget, "loads": self.loads, "extras": []}
        with self._lock:
            return {
                "device": str(self.device), "dtype": devices.dtype_name(self.dtype),
                "entries": [{"label": e.label, "tier": e.tier, "bytes": e.nbytes, "locked": e.locks > 0}
                            for e in self._entries.values()],
                "device_used": self.used("device"), "device_budget": self.budget("device"),
                "ram_used": self.ram_used(), "ram_budget": self.budget("cpu"), "loads": self.loads,
                "extras": [{"label": label, "bytes": n} for label, n in self.extras()],
            }

    def _make_room(self, tier: str, needed: int, keep: tuple | None = None) -> None:
        """Evict least-recently-used unlocked entries until ``needed`` more bytes fit in ``tier``."""
        budget = self.budget(tier)
        for key in list(self._entries):
            if self.used(tier) + needed <= budget:
                return
            entry = self._entries[key]
            if entry.tier != tier or entry.locks > 0 or key == keep:
                continue
            if tier == "device" and not self.single_tier and entry.nbytes <= self.budget("cpu"):
                self._make_room("cpu", entry.nbytes, keep=keep)
                self._move(entry, "cpu")
            else:
                self._drop(key)
        if self.used(tier) + needed > budget:
            log.warning("Memory budget for %s exceeded (%d MB used + %d MB needed > %d MB); models in use are "
                        "never evicted.", tier, self.used(tier) >> 20, needed >> 20, budget >> 20)

    def free_device_memory(self, keep: str | CheckpointInfo | None = None) -> int:
        """After running out of memory: take every unlocked model but the checkpoint ``keep`` ("" = the current
        one) off the device (parked in RAM while the RAM budget allows, else dropped) and empty the allocator
        caches. Returns the bytes taken off."""
        with self._lock:
            try:
                keep_key = self.key_for(self._resolve(keep)) if keep is not None else None
            except (OSError, StudioError):  # a name that does not resolve keeps nothing
                keep_key = None
            freed = 0
            if not self.offloading:  # offloaded models already rest in RAM: only the allocator cache holds VRAM
                for key, entry in list(self._entries.items()):
                    if entry.tier != "device" or entry.locks > 0 or key == keep_key:
                        continue
                    freed += entry.nbytes
                    if not self.single_tier and entry.nbytes <= self.budget("cpu"):
                        self._make_room("cpu", entry.nbytes, keep=keep_key)
                        self._move(entry, "cpu")
                    else:
                        self._drop(key)
            if freed:
                log.info("Out of memory: %d MB of cached models taken off the device", freed >> 20)
            devices.release_memory(self.device)
            return freed

    def _move(self, entry: Entry, tier: str) -> None:
        target = self.placement if tier == "device" else torch.device("cpu")
        value = entry.value
        modules = value.modules().values() if isinstance(value, Components) else [value]
        for module in modules:
            if not offload.rests_in_ram(module):  # --lowvram: weights already in RAM, parameters on meta
                devices.move_module(module, target, pin=self.settings.pin_memory and self.device.type == "cuda")
        entry.tier = tier
        devices.release_memory(self.device)

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        log.info("Unloaded %s (%d MB)", entry.label, entry.nbytes >> 20)
        entry.value = None
        devices.release_memory(self.device)

    # ---- loading ---------------------------------------------------------------------------------
    def _load_components(self, info: CheckpointInfo) -> Components:
        from .loading import diffusers_folder, hub, single_file

        prediction = (self.settings.model_overrides.get(info.name) or {}).get("prediction")
        if prediction not in (None, "v", "epsilon", "v_prediction"):
            raise StudioError(f"Per-model setting prediction={prediction!r} for {info.name} is not valid.",
                              field="model_overrides", fix="use 'v' or 'epsilon'")
        prediction = {"v": "v_prediction"}.get(prediction, prediction)
        # load on the CPU, then move: a half-read file never leaves a half-filled GPU behind
        try:
            if info.kind == "file":
                loader = self._loaders.get("file", single_file.load_single_file)
                extra = {}
                if loader is single_file.load_single_file:   # parts kept apart (models/text_encoder, VAE)
                    from .loading import companions
                    folders = [*self.settings.companion_paths, self.settings.vae_path]
                    extra["companions"] = lambda: companions.find(folders)   # read only if a file needs them
                comps = loader(info.path, dtype=self.dtype, device="cpu", prediction=prediction, **extra)
            elif info.kind == "diffusers":
                loader = self._loaders.get("diffusers", diffusers_folder.load_diffusers_folder)
                comps = loader(info.path, dtype=self.dtype, device="cpu")
            else:
                loader = self._loaders.get("hub", hub.load_hub_repo)
                comps = loader(str(info.path), allow_download=self.settings.allow_download, dtype=self.dtype,
                               device="cpu")
        except (ValueError, KeyError, IndexError, AssertionError, ZeroDivisionError) as e:
            # diffusers / transformers refusing an odd layout deep inside conversion: the file is at fault
            log.warning("Loading %s failed", info.path, exc_info=True)
            raise ModelLoadError(f"{info.name} could not be loaded: {type(e).__name__}: {e}.", path=str(info.path),
                                 fix="the file is damaged or an unsupported variant; use a standard SD 1 / 2 / "
                                     "XL checkpoint") from e
        vdtype = devices.vae_dtype(self.settings, self.dtype)
        if comps.vae.dtype != vdtype:
            comps.vae.to(vdtype)
        return comps

    def key_for(self, info: CheckpointInfo) -> tuple:
        """The cache key: a file by path, mtime and size (hashing 2 GB takes seconds, so it happens in the
        background), a folder by its id, a repo by its name; plus dtype, device and the weight quantisation
        (changing ``quantize`` loads the model again instead of reusing the other copy)."""
        from .quantize import effective
        if info.kind == "file":
            ident: Any = (str(info.path), *info.stat_key())
        else:
            ident = self.registry.ensure_hash(info) if info.kind != "hub" else info.name
        return ("ckpt", ident, devices.dtype_name(self.dtype), str(self.device),
                effective(self.settings.quantize, self.device))

    def _estimate(self, info: CheckpointInfo) -> int | None:
        """The bytes ``info`` will take once loaded, from its file headers (None: unknown before loading)."""
        from .loading.sizes import checkpoint_bytes

        return checkpoint_bytes(info.path, info.kind, self.dtype.itemsize,
                                devices.vae_dtype(self.settings, self.dtype).itemsize)

    def _get_or_load(self, info: CheckpointInfo) -> Entry:
        key = self.key_for(info)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.last_used = time.monotonic()
            if entry.tier != "device":
                self._make_room("device", entry.nbytes, keep=key)
                self._move(entry, "device")
            return entry
        started = time.monotonic()
        self._make_room_for(self._estimate(info))
        comps = self._load_components(info)
        self.loads += 1
        self._quantise(comps)
        nbytes = comps.nbytes()
        self._make_room("device", nbytes)
        if self.placement.type != "cpu":
            for module in comps.modules().values():
                module.to(self.placement)
        info.family = comps.family
        entry = Entry(key, info.name, comps, nbytes, "device")
        self._entries[key] = entry
        self.registry.hash_later(info)  # for lists and infotexts; the key does not need it
        log.info("Loaded %s (%s, %d MB) in %.1fs", info.name, comps.family, nbytes >> 20,
                 time.monotonic() - started)
        for hook in list(self.on_model_loaded):
            try:
                hook(info, comps)
            except Exception:  # a listener must never break loading
                log.exception("on_model_loaded listener failed")
        return entry

    def _quantise(self, comps: Components) -> None:
        """The ``quantize`` setting, on the CPU before the move to the device (the card never holds the float
        copy; the room made before loading stays the float size: that is the peak while quantising)."""
        from . import quantize
        mode = quantize.effective(self.settings.quantize, self.device)
        if mode != "none" and self.settings.offload == "lowvram":
            # accelerate's sequential offload moves plain parameters to meta and back; torchao's tensors do not
            # survive that, so --lowvram keeps the weights float
            log.warning("--quantize %s is not used with --lowvram; the weights stay float.", mode)
            comps.notes.append(f"quantize={mode} is not used with --lowvram (the weights stay float)")
            return
        comps.notes.extend(quantize.apply(comps, self.settings.quantize, self.device, self.dtype))

    def _make_room_for(self, estimate: int | None) -> None:
        """Room before reading a file, from the size its header tells: made after loading, the old models and
        the new one would be held at once (an OOM on a GPU). The real size is checked again after loading."""
        if estimate:
            self._make_room("device", estimate)

    def _get_vae(self, vinfo: VaeInfo, components: Components) -> Entry:
        from .loading.single_file import load_vae_file
        from .loading.sizes import module_bytes

        vdtype = devices.vae_dtype(self.settings, self.dtype)
        # the latent scaling factor is not in the weights: it follows the family it is used with
        if vinfo.kind == "file":  # like checkpoints: keyed by the file as it is now, hashed in the background
            st = vinfo.path.stat()
            ident: Any = (str(vinfo.path), st.st_mtime_ns, st.st_size)
            self.registry.hash_later(vinfo)
        else:
            ident = self.registry.ensure_vae_hash(vinfo)
        key = ("vae", ident, components.family, devices.dtype_name(vdtype), str(self.device))
        entry = self._entries.get(key)
        if entry is None:
            self._make_room_for(module_bytes(vinfo.path, vdtype.itemsize))
            if vinfo.kind == "diffusers":
                from diffusers import AutoencoderKL
                vae = AutoencoderKL.from_pretrained(vinfo.path, torch_dtype=vdtype, local_files_only=True)
            else:
                vae = load_vae_file(vinfo.path, dtype=vdtype, device="cpu", family=components.family)
            self.loads += 1
            nbytes = _module_bytes(vae)
            self._make_room("device", nbytes)
            vae.to(self.placement)
            entry = Entry(key, f"VAE {vinfo.name}", vae, nbytes, "device")
            self._entries[key] = entry
        else:
            self._entries.move_to_end(key)
            if entry.tier != "device":
                self._make_room("device", entry.nbytes, keep=key)
                self._move(entry, "device")
        own = components.vae.config
        if entry.value.config.latent_channels != own.latent_channels:
            raise StudioError(f"VAE {vinfo.name!r} has {entry.value.config.latent_channels} latent channels, the "
                              f"checkpoint needs {own.latent_channels}.", field="vae",
                              fix="pick a VAE made for this model family, or Automatic")
        return entry

    @contextlib.contextmanager
    def acquire(self, checkpoint: str | CheckpointInfo = "", vae: str = "Automatic") -> Iterator[Loaded]:
        """Load (or reuse) a checkpoint and VAE and lock them for the duration of the ``with`` block.

        A failed load raises StudioError / ModelLoadError and leaves every loaded model as it was.
        """
        with self._lock:
            info = self._resolve(checkpoint)
            entry = self._get_or_load(info)
            entry.locks += 1
            locked = [entry]
            try:
                comps: Components = entry.value
                loaded = Loaded(info, comps, entry.key, vae=comps.vae)
                vinfo = self._resolve_vae(info, vae)
                if vinfo is not None:
                    ventry = self._get_vae(vinfo, comps)
                    ventry.locks += 1
                    locked.append(ventry)
                    loaded.vae, loaded.vae_info = ventry.value, vinfo
                self.current = info
            except BaseException:
                entry.locks -= 1
                raise
        try:
            yield loaded
        finally:
            with self._lock:
                for e in locked:
                    e.locks -= 1

    def _resolve(self, checkpoint: str | CheckpointInfo) -> CheckpointInfo:
        if isinstance(checkpoint, CheckpointInfo):
            return self.registry._still_there(checkpoint) if checkpoint.kind != "hub" else checkpoint
        if checkpoint:
            return self.registry.find_checkpoint(checkpoint)
        if self.current is not None and (self.current.kind == "hub" or self.current.path.exists()):
            return self.current
        if self.settings.default_checkpoint:
            return self.registry.find_checkpoint(self.settings.default_checkpoint)
        available = self.registry.checkpoints()
        if not available:
            raise StudioError(f"No checkpoint found in {self.settings.ckpt_path}.", field="checkpoint",
                              fix="drop a .safetensors checkpoint or a diffusers folder there, point --ckpt-dir at "
                                  "an A1111 models/Stable-diffusion folder, or start with --demo", status=404)
        return available[0]

    def _resolve_vae(self, info: CheckpointInfo, vae: str) -> VaeInfo | None:
        if vae in ("", "None"):
            return None
        if vae == "Automatic":
            return self.registry.sidecar_vae(info)
        return self.registry.find_vae(vae)

    def ensure_hashes(self, loaded: Loaded) -> None:
        """The hashes an infotext names: waits for a first load's background hash (or computes it now)."""
        try:
            if loaded.info.kind != "hub":
                self.registry.ensure_hash(loaded.info)
            if loaded.vae_info is not None:
                self.registry.ensure_vae_hash(loaded.vae_info)
        except OSError as exc:  # the file went away after loading: the image is still good, only unhashed
            log.warning("Could not hash %s: %s", loaded.info.path, exc)

    def load(self, checkpoint: str | CheckpointInfo = "") -> CheckpointInfo:
        """Make a checkpoint the current one (loading it if needed)."""
        with self.acquire(checkpoint, vae="None") as loaded:
            return loaded.info

    def unload_all(self) -> None:
        """Drop every unlocked model (A1111's unload-checkpoint)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.locks == 0]:
                self._drop(key)

    def current_components(self) -> Components | None:
        """The current checkpoint's components if they are in memory (never loads anything)."""
        with self._lock:
            return self.cached_components(self.current) if self.current is not None else None

    def cached_components(self, info: CheckpointInfo) -> Components | None:
        """A checkpoint's components if they are in memory (never loads anything)."""
        with self._lock:
            try:
                entry = self._entries.get(self.key_for(info))
            except (OSError, StudioError):
                return None
            return entry.value if entry is not None else None

    def is_cached(self, info: CheckpointInfo) -> bool:
        with self._lock:
            return self.key_for(info) in self._entries

    @contextlib.contextmanager
    def acquire_module(self, key: tuple, label: str, load: Callable[[], Any],
                       size_hint: int | None = None) -> Iterator[Any]:
        """An extra module (e.g. a ControlNet) cached under ``key`` in the same LRU and budgets as checkpoints;
        ``load()`` runs only on a miss (on the CPU; it is moved to the device here). Locked for the ``with``.

        ``size_hint``: its bytes once loaded if known beforehand (``loading.sizes.module_bytes``), so room is
        made before ``load()`` reads the file."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._make_room_for(size_hint)
                module = load()
                self.loads += 1
                nbytes = _module_bytes(module)
                self._make_room("device", nbytes)
                module.to(self.placement)
                entry = Entry(key, label, module, nbytes, "device")
                self._entries[key] = entry
            else:
                self._entries.move_to_end(key)
                entry.last_used = time.monotonic()
                if entry.tier != "device":
                    self._make_room("device", entry.nbytes, keep=key)
                    self._move(entry, "device")
            entry.locks += 1
        try:
            yield entry.value
        finally:
            with self._lock:
                entry.locks -= 1

    # ---- pipelines as views ------------------------------------------------------------------------
    def pipeline(self, loaded: Loaded, mode: str, scheduler: Any) -> Any:
        """A diffusers pipeline for ``mode`` over the SAME modules (no copies, no dtype changes).

        ``mode`` is "txt2img", "img2img" or "inpaint". A 9-channel inpainting checkpoint serves every mode
        through its inpaint pipeline (the engine passes a full mask), as A1111 lets it.
        """
        c = loaded.components
        spec = c.spec
        if not spec.accepts_channels(c.in_channels):
            raise StudioError(f"{loaded.info.name} is an image-edit checkpoint ({c.in_channels} input channels), "
                              "which this studio cannot drive yet.", field="checkpoint",
                              fix="pick an ordinary or inpainting checkpoint")
        if not spec.txt2img and mode == "txt2img":
            raise StudioError(f"{loaded.info.name} is an {spec.label} checkpoint; it cannot make images from text "
                              "alone.", field="checkpoint", fix="use it in img2img, or pick a base checkpoint")
        kind = spec.pipeline_mode(mode, c.in_channels)
        pipe = spec.make_pipeline(kind, {**c.text_modules(), "vae": loaded.vae, "unet": c.unet,
                                         "scheduler": scheduler})
        self._apply_device_options(pipe)
        return pipe

    def _apply_device_options(self, pipe: Any) -> None:
        """xformers and offload hooks for a view: put on each shared module once, then reused by every view."""
        parts = pipe.components
        chain = [parts.get(n) for n in ("text_encoder", "text_encoder_2", "unet", "transformer", "vae")]
        net = parts.get("controlnet")
        # the per-job ControlNet set wraps the cached ControlNets: those carry the hooks
        nets = list(getattr(net, "nets", None) or ([net] if net is not None else []))
        if devices.xformers_usable(self.settings, self.device, self.probes):
            offload.enable_xformers([*chain, *nets])
        if self.offloading:
            offload.prepare(chain, nets, self.settings.offload, self.execution_device)
            if self.settings.offload == "medvram":
                with self._lock:
                    held = [m for e in self._entries.values() if e.value is not None
                            for m in (e.value.modules().values() if isinstance(e.value, Components) else [e.value])]
                offload.offload_idle(held)
