"""ControlNet models on disk (models/ControlNet) and loading them offline into diffusers ``ControlNetModel``.

Titles follow the A1111 extension: ``<file stem> [<8 hex>]`` where the hash is A1111's ``sd_models.model_hash``
(the old 8-hex hash of 64 KiB at offset 1 MiB; e.g. ``control_v11p_sd15_canny [d14c016b]``), so API scripts
written for the extension find the same models. A file under 1 MiB would get sha256 of nothing (e3b0c442) there;
it gets its own short sha256 (``hashes.title_model_hash``). A diffusers folder is titled by its name and the hash
of its weights file.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import families
from ..errors import ModelLoadError, StudioError
from ..folders import FolderWatch
from ..hashes import HashCache
from ..lazy import torch
from ..settings import Settings
from . import convert

EXTS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


@dataclass
class ControlNetInfo:
    """One ControlNet: a single file or a diffusers folder (config.json + weights)."""

    name: str                   # path relative to models/ControlNet, '/'-separated
    path: Path
    kind: str                   # "file" | "diffusers"
    hash: str | None = None     # A1111 model_hash (8 hex) of the file / the folder's weights file
    family: str | None = None   # known once read (header or config.json) or loaded

    @property
    def model_name(self) -> str:
        base = Path(self.name).name
        return os.path.splitext(base)[0] if self.kind == "file" else base

    @property
    def title(self) -> str:
        return f"{self.model_name} [{self.hash}]" if self.hash else self.model_name


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def folder_weights(folder: Path) -> Path | None:
    """The weights file of a diffusers ControlNet folder (None when it has none)."""
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


class ControlNetLibrary:
    """Scans the ControlNet folder; resolves names and titles the way the A1111 extension does."""

    def __init__(self, settings: Settings, hash_cache: HashCache | None = None):
        self.settings = settings
        self.hashes = hash_cache or HashCache(settings.cache_file)
        self._lock = threading.RLock()
        self._items: dict[str, ControlNetInfo] = {}
        self._watch = FolderWatch()
        self.refresh()

    @property
    def root(self) -> Path:
        return Path(self.settings.controlnet_path)

    def refresh(self) -> list[ControlNetInfo]:
        """Re-read the folder. Hashes cost one 64 KiB read per new file (cached by path, mtime and size)."""
        found: dict[str, ControlNetInfo] = {}
        root = self.root
        self._watch.mark([root])
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                here = Path(dirpath)
                if here != root and (here / "config.json").is_file():
                    info = ControlNetInfo(here.relative_to(root).as_posix(), here.resolve(), "diffusers")
                    weights = folder_weights(here)
                    if weights is not None:  # the extension lists (and hashes) the weights file itself
                        try:
                            info.hash = self.hashes.get_or_compute(weights, "title")
                        except OSError:
                            pass
                    found[info.name] = info
                    dirnames[:] = []
                    continue
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if fn.lower().endswith(EXTS) and not fn.startswith(".") and \
                            os.path.splitext(fn)[0] != "None":  # "None" is the extension's "no model"
                        p = here / fn
                        info = ControlNetInfo(p.relative_to(root).as_posix(), p.resolve(), "file")
                        try:
                            info.hash = self.hashes.get_or_compute(p, "title")
                        except OSError:
                            continue
                        found[info.name] = info
        with self._lock:
            old = self._items
            for key, info in found.items():  # keep families already learned
                if key in old and old[key].path == info.path:
                    info.family = old[key].family
            self._items = dict(sorted(found.items(), key=lambda kv: Path(kv[0]).name.lower()))
            return list(self._items.values())

    def refresh_if_changed(self) -> bool:
        """Rescan when a file was added, removed or rewritten since the last scan (a stat walk, no file read)."""
        if not self._watch.changed([self.root]):
            return False
        self.refresh()
        return True

    def list(self) -> list[ControlNetInfo]:
        with self._lock:
            return list(self._items.values())

    def titles(self) -> list[str]:
        """What ``/controlnet/model_list`` returns."""
        return [i.title for i in self.list()]

    def find(self, name_or_title: str, field: str = "controlnet.model") -> ControlNetInfo | None:
        """By title, name, file name or stem (case-insensitive), or the 8-hex hash. "None"/"" -> None."""
        query = (name_or_title or "").strip()
        if query in ("", "None", "none"):
            return None
        if os.path.isabs(query) or ".." in re.split(r"[\\/]", query):
            raise StudioError(f"ControlNet model {name_or_title!r} contains a path; only names inside "
                              f"{self.root} are allowed.", field=field,
                              fix="pass the title from /controlnet/model_list")
        for attempt in (0, 1):
            items = self.list()
            for info in items:
                if query == info.title or query in (info.name, info.model_name, Path(info.name).name):
                    return self._still_there(info, field)
            m = re.fullmatch(r"(.*?)\s*\[([0-9a-fA-F]{8,10})\]", query)
            stem, digest = (m.group(1), m.group(2).lower()) if m else (query, None)
            lowered = stem.lower()
            for info in items:  # a title whose hash changed (file updated) still finds its model by name
                if lowered and lowered in (info.model_name.lower(), info.name.lower(), Path(info.name).name.lower()):
                    return self._still_there(info, field)
            for info in items:
                if (digest or lowered) == info.hash:
                    return self._still_there(info, field)
            if attempt == 0:
                self.refresh()  # a file dropped in since the last scan
        titles = ", ".join(self.titles()) or f"none: {self.root} is empty"
        raise StudioError(f"ControlNet model {name_or_title!r} was not found in {self.root}.", field=field,
                          fix=f"choose one of: {titles}", status=404)

    def _still_there(self, info: ControlNetInfo, field: str) -> ControlNetInfo:
        if not info.path.exists():
            self.refresh()
            raise StudioError(f"ControlNet model {info.name!r} is no longer on disk ({info.path}).", field=field,
                              path=str(info.path), status=404, fix="put it back or pick another model")
        return info

    def probe_family(self, info: ControlNetInfo) -> str | None:
        """The family when it is cheap to know (safetensors header, config.json); None for pickles."""
        if info.family is None:
            try:
                info.family = peek_family(info.path)
            except (StudioError, OSError, ValueError):
                info.family = None
        return info.family

    def key(self, info: ControlNetInfo) -> tuple:
        """Cache key for the manager: the file's identity (hash + size + mtime), not its name."""
        st = info.path.stat()
        return ("controlnet", str(info.path), info.hash, st.st_size, st.st_mtime_ns)


# ---- loading -----------------------------------------------------------------------------------------

def _global_pool(path: str) -> bool:
    """Shuffle ControlNets pool their outputs globally (control_v11e_sd15_shuffle.yaml global_average_pooling);
    the extension decides it from the model's yaml / name, so do we."""
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    if os.path.isfile(yaml_path):
        with open(yaml_path, encoding="utf-8", errors="replace") as f:
            if re.search(r"global_average_pooling:\s*[Tt]rue", f.read()):
                return True
    return "shuffle" in os.path.basename(path).lower()


def _family_from_config(cfg) -> str:
    return families.detect_controlnet(cfg).name


def controlnet_family(model) -> str:
    """Family of a loaded ControlNetModel (from its config)."""
    return _family_from_config(model.config)


def peek_family(path) -> str | None:
    """Family without loading weights (safetensors header or config.json); None when that needs a full read."""
    path = Path(path)
    if path.is_dir():
        import json
        return _family_from_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
    if path.suffix.lower() != ".safetensors":
        return None
    from ..loading.state_dict import read_header_shapes
    shapes = convert.strip_prefix(read_header_shapes(str(path)))
    kind = convert.file_kind(list(shapes))
    if kind == "diffusers":
        shapes = convert.diffusers_shapes_to_ldm(shapes)
    elif kind != "ldm":
        convert.raise_unsupported(kind, str(path))
    return convert.controlnet_config(shapes, str(path))[1]


def load_controlnet(path, dtype=None, device="cpu", *, addition_time_embed_dim: int | None = None):
    """(ControlNetModel, family) from a diffusers folder or an lllyasviel/diffusers-keyed single file, offline.

    ``addition_time_embed_dim``: SDXL only; pass the base UNet's value (256 for real SDXL, the default).
    ``dtype``: float32 when None."""
    from diffusers import ControlNetModel
    dtype = torch.float32 if dtype is None else dtype

    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{path} has no config.json; not a diffusers ControlNet folder.", path=path,
                                 fix="use a folder saved by diffusers (config.json + weights) or a single file.")
        try:
            model = ControlNetModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"The ControlNet folder {path} could not be loaded ({str(e)[:300]}).", path=path,
                                 fix="check that the folder holds config.json and its weights file.") from e
        return model.to(device).eval(), _family_from_config(model.config)

    from ..loading.single_file import build_module
    from ..loading.state_dict import read_header_shapes, read_state_dict

    if path.lower().endswith(".safetensors"):  # refuse LoRA/adapter files before reading their tensors
        kind = convert.file_kind(list(convert.strip_prefix(read_header_shapes(path))))
        if kind not in ("ldm", "diffusers"):
            convert.raise_unsupported(kind, path)
    sd = convert.strip_prefix(read_state_dict(path))
    kind = convert.file_kind(list(sd))
    if kind not in ("ldm", "diffusers"):
        convert.raise_unsupported(kind, path)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if kind == "diffusers":
        shapes = convert.diffusers_shapes_to_ldm(shapes)
    cfg, family = convert.controlnet_config(shapes, path, global_pool=_global_pool(path),
                                            addition_time_embed_dim=addition_time_embed_dim)
    from accelerate import init_empty_weights
    with init_empty_weights():
        expected = list(ControlNetModel.from_config(cfg).state_dict())
    state = sd if kind == "diffusers" else convert.ldm_to_diffusers_state(sd, expected, cfg, path)
    model = build_module(lambda: ControlNetModel.from_config(cfg), state, what="ControlNet", path=path,
                         dtype=dtype, device=device)
    return model, family


def check_family(controlnet_family: str | None, checkpoint_family: str | None,
                 names: tuple[str, str] = ("the ControlNet", "the checkpoint"),
                 field: str = "controlnet.model") -> None:
    """Raise StudioError naming both models when a ControlNet is for another base family."""
    if not controlnet_family or not checkpoint_family or controlnet_family == checkpoint_family:
        return
    cn, ckpt = names
    want, got = families.label(checkpoint_family), families.label(controlnet_family)
    raise StudioError(f"ControlNet {cn} is for {got} but checkpoint {ckpt} is {want}.", field=field,
                      fix=f"pick a ControlNet made for {want} models, or a {got} checkpoint")
