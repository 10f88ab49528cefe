"""The preprocessor registry: name -> function + parameter spec (+ annotator weight files it needs).

Built-ins (``builtin.py``) and extensions register through the same ``Preprocessors.register``. A registry
instance owns two caches: loaded annotator models (LRU by count and bytes) and results keyed by
(image digest, module, resolution, parameters), so a unit that did not change costs no preprocessing.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import StudioError

log = logging.getLogger(__name__)

ANNOTATORS_REPO = "lllyasviel/Annotators"
RESOLUTION_RANGE = (64, 2048)


@dataclass(frozen=True)
class ParamSpec:
    """One slider. The first two params of a preprocessor are the unit's threshold_a / threshold_b."""

    name: str
    label: str
    min: float
    max: float
    default: float
    step: float = 1.0


@dataclass
class Preprocessor:
    """``fn(image: RGB PIL, resolution: int, params: {name: value}, model) -> PIL image or HxW(x3) uint8``.

    ``loader(files: {file name: Path}) -> model`` builds the annotator model once from its weight files; the
    registry caches it under ``model_key`` (preprocessors sharing weights share the key)."""

    name: str
    fn: Callable[..., Any]
    params: list[ParamSpec] = field(default_factory=list)
    needs_weights: list[str] = field(default_factory=list)
    resolution: int | None = 512          # None: the preprocessor has no resolution slider
    loader: Callable[[dict], Any] | None = None
    model_key: str = ""
    label: str = ""
    requires: str = ""                    # an optional Python package it needs (named in the error)

    @property
    def model_free(self) -> bool:
        return not self.needs_weights and self.loader is None


def image_digest(image: Image.Image) -> str:
    """Content hash of an image (pixels, size, mode); the result cache's key."""
    h = hashlib.sha1(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the short side is ``resolution`` (how annotators are run), keeping the aspect ratio."""
    w, h = image.size
    k = resolution / min(w, h)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    return image if size == image.size else image.resize(size, Image.LANCZOS if k < 1 else Image.BICUBIC)


def pixel_perfect_resolution(image_size: tuple[int, int], target_w: int, target_h: int, resize_mode: int) -> int:
    """The A1111 extension's pixel-perfect resolution: the annotator runs at the size the map will be used at.
    ``resize_mode`` 2 (Resize and Fill) fits inside the target, 0/1 cover it."""
    raw_w, raw_h = image_size
    k0, k1 = target_h / raw_h, target_w / raw_w
    k = min(k0, k1) if resize_mode == 2 else max(k0, k1)
    return int(np.round(k * min(raw_h, raw_w)))


def _to_pil(result: Any) -> Image.Image:
    if isinstance(result, Image.Image):
        return result.convert("RGB") if result.mode != "RGB" else result
    arr = np.asarray(result)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr).convert("RGB")


def _module_bytes(model: Any) -> int:
    total = 0
    for obj in (model, *vars(model).values()) if hasattr(model, "__dict__") else (model,):
        if hasattr(obj, "parameters") and callable(obj.parameters):
            try:
                total += sum(p.numel() * p.element_size() for p in obj.parameters())
            except TypeError:
                pass
    return total


class Preprocessors:
    """Registry + caches. ``annotators_dir`` is models/annotators (lllyasviel/Annotators file layout)."""

    def __init__(self, annotators_dir: str | os.PathLike | None = None, *, max_models: int = 2,
                 max_model_bytes: int = 4 << 30, max_results: int = 32, device: Callable[[], Any] | None = None):
        self.annotators_dir = Path(annotators_dir) if annotators_dir else None
        # asked when a model is loaded (resolving the compute device imports torch: not at construction)
        self._device = device
        self.max_models, self.max_model_bytes, self.max_results = max_models, max_model_bytes, max_results
        self._items: dict[str, Preprocessor] = {}
        self._aliases: dict[str, str] = {}
        self._models: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._results: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._lock = threading.RLock()
        self.runs: Counter = Counter()     # preprocessor name -> times actually run (tests / benchmarks)
        self.cache_hits = 0
        self.model_loads = 0

    # ---- registry ----------------------------------------------------------------------------------
    def register(self, name: str, fn: Callable[..., Any], params: Sequence[ParamSpec] = (), *,
                 needs_weights: Sequence[str] = (), resolution: int | None = 512,
                 loader: Callable[[dict], Any] | None = None, model_key: str = "", label: str = "",
                 requires: str = "", replace: bool = False) -> Preprocessor:
        """Add a preprocessor (the extension hook calls this). Names are the API's ``module`` values."""
        if not name or name != name.strip():
            raise ValueError(f"bad preprocessor name {name!r}")
        if len(params) > 2:
            raise ValueError("at most two parameters (threshold_a, threshold_b) per preprocessor")
        with self._lock:
            if name in self._items and not replace:
                raise ValueError(f"preprocessor {name!r} is already registered")
            item = Preprocessor(name, fn, list(params), list(needs_weights), resolution, loader,
                                model_key or name, label or name, requires)
            self._items[name] = item
            self._results = OrderedDict((k, v) for k, v in self._results.items() if k[1] != name)
            return item

    def alias(self, old: str, name: str) -> None:
        """Accept ``old`` (e.g. the extension's pre-1.1 module names such as "hed") for ``name``."""
        with self._lock:
            self._aliases[old] = name

    def names(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def get(self, name: str, field: str = "controlnet.module") -> Preprocessor:
        key = (name or "none").strip()
        with self._lock:
            key = self._aliases.get(key, key)
            item = self._items.get(key) or next((p for n, p in self._items.items() if n.lower() == key.lower()), None)
        if item is None:
            raise StudioError(f"Unknown ControlNet preprocessor {name!r}.", field=field,
                              fix=f"use one of: {', '.join(self.names())}")
        return item

    def module_detail(self) -> dict[str, dict]:
        """``/controlnet/module_list``'s ``module_detail``: {name: {model_free, sliders: [...]}}."""
        out = {}
        for item in (self.get(n) for n in self.names()):
            sliders = []
            if item.resolution is not None:
                sliders.append({"name": "Resolution", "value": item.resolution, "min": RESOLUTION_RANGE[0],
                                "max": RESOLUTION_RANGE[1], "step": 8})
            sliders += [{"name": p.label, "value": p.default, "min": p.min, "max": p.max, "step": p.step}
                        for p in item.params]
            out[item.name] = {"model_free": item.model_free, "sliders": sliders}
        return out

    # ---- parameters --------------------------------------------------------------------------------
    def resolve(self, name: str, resolution: float = -1, threshold_a: float = -1,
                threshold_b: float = -1) -> tuple[int, dict[str, float]]:
        """(resolution, params) with -1 / out-of-range values replaced by defaults, as the extension does."""
        item = self.get(name)
        res = int(resolution) if resolution is not None and RESOLUTION_RANGE[0] <= resolution <= \
            RESOLUTION_RANGE[1] else (item.resolution or 512)
        params = {}
        for spec, value in zip(item.params, (threshold_a, threshold_b)):
            ok = value is not None and spec.min <= float(value) <= spec.max
            params[spec.name] = float(value) if ok else spec.default
        return res, params

    # ---- running -----------------------------------------------------------------------------------
    def locate(self, filename: str, annotators_dir: Path | None = None) -> Path:
        """The weight file in the annotators folder (directly or in a subfolder) or a StudioError naming it."""
        root = annotators_dir or self.annotators_dir
        if root is not None:
            direct = root / filename
            if direct.is_file():
                return direct
            if root.is_dir():
                found = next((p for p in sorted(root.rglob(filename)) if p.is_file()), None)
                if found is not None:
                    return found
        where = root / filename if root is not None else Path("models/annotators") / filename
        raise StudioError(f"{where} is missing; get it from the Hugging Face repo {ANNOTATORS_REPO} and put it "
                          "there.", field="controlnet.module", path=str(where),
                          fix=f"download {filename} from https://huggingface.co/{ANNOTATORS_REPO} into {where.parent}")

    def _model(self, item: Preprocessor, annotators_dir: Path | None) -> Any:
        if item.loader is None:
            return None
        if item.requires:
            import importlib.util
            if importlib.util.find_spec(item.requires) is None:
                raise StudioError(f"The {item.name} preprocessor needs the Python package {item.requires!r}, "
                                  "which is not installed.", field="controlnet.module",
                                  fix=f"pip install {item.requires} in the studio's environment, or pick another "
                                      "preprocessor")
        files = {f: self.locate(f, annotators_dir) for f in item.needs_weights}
        key = (item.model_key, tuple(str(p) for p in files.values()))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
        if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "").lower() in ("1", "true", "yes"):
            # annotator loaders call torch.load with its default, which this variable turns unsafe
            raise StudioError("Annotator weights are only read with weights_only=True, but "
                              "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set.", field="controlnet.module",
                              fix="unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        try:
            model = item.loader(files)
        except StudioError:
            raise
        except Exception as e:  # a broken or foreign weight file
            names = ", ".join(str(p) for p in files.values())
            raise StudioError(f"The {item.name} preprocessor could not load {names} ({type(e).__name__}: "
                              f"{str(e)[:200]}).", field="controlnet.module", path=names,
                              fix=f"re-download the file(s) from https://huggingface.co/{ANNOTATORS_REPO}") from e
        model = self._to_device(item, model)
        nbytes = _module_bytes(model)
        with self._lock:
            self.model_loads += 1
            self._models[key] = (model, nbytes)
            while len(self._models) > 1 and (len(self._models) > self.max_models or
                                            sum(b for _, b in self._models.values()) > self.max_model_bytes):
                self._models.popitem(last=False)
        return model

    def _to_device(self, item: Preprocessor, model: Any) -> Any:
        """The annotator on the compute device (controlnet-aux detectors follow their weights' device with the
        input); it stays on the CPU when there is nothing else, it has no ``to``, or the move fails."""
        device = self._device() if self._device is not None else None
        if device is None or str(device) == "cpu" or not callable(getattr(model, "to", None)):
            return model
        try:
            moved = model.to(device)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the CPU still works, only slower
            log.warning("The %s annotator stays on the CPU: moving it to %s failed (%s: %s).", item.name, device,
                        type(e).__name__, str(e)[:200])
            model.to("cpu")  # a move that failed half way leaves parts behind
            return model
        return model if moved is None else moved

    def run(self, name: str, image: Image.Image, resolution: float = -1, params: Mapping[str, float] | None = None,
            annotators_dir: str | os.PathLike | None = None, *, threshold_a: float = -1,
            threshold_b: float = -1) -> Image.Image:
        """Run a preprocessor (cached). ``params`` by name, or the unit's threshold_a / threshold_b."""
        item = self.get(name)
        res, resolved = self.resolve(name, resolution, threshold_a, threshold_b)
        for key, value in (params or {}).items():
            if key not in resolved:
                raise StudioError(f"Preprocessor {name} has no parameter {key!r}.", field="controlnet.module",
                                  fix=f"use {', '.join(resolved) or 'no parameters'}")
            resolved[key] = float(value)
        image = image.convert("RGB") if image.mode != "RGB" else image
        root = Path(annotators_dir) if annotators_dir else None
        ckey = (image_digest(image), item.name, res if item.resolution is not None else None,
                tuple(sorted(resolved.items())), str(root or self.annotators_dir))
        with self._lock:
            hit = self._results.get(ckey)
            if hit is not None:
                self._results.move_to_end(ckey)
                self.cache_hits += 1
                return hit.copy()
        model = self._model(item, root)
        out = _to_pil(item.fn(image, res, dict(resolved), model))
        with self._lock:
            self.runs[item.name] += 1
            self._results[ckey] = out
            while len(self._results) > self.max_results:
                self._results.popitem(last=False)
        return out.copy()

    def clear(self, models: bool = True, results: bool = True) -> None:
        with self._lock:
            if models:
                self._models.clear()
            if results:
                self._results.clear()
