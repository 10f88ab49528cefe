"""What is on disk: checkpoints and VAEs in the model folders, their A1111 names, titles and hashes."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StudioError
from .folders import FolderWatch
from .hashes import BackgroundHasher, HashCache, short_hash
from .settings import Settings

CKPT_EXTS = (".safetensors", ".ckpt", ".gguf")   # GGUF: quantised DiT transformers (city96)
VAE_EXTS = (".safetensors", ".ckpt", ".pt", ".bin")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

log = logging.getLogger(__name__)


@dataclass
class CheckpointInfo:
    """One checkpoint: a single file, a diffusers folder, or a Hugging Face repo id."""

    name: str                 # path relative to the checkpoint folder, '/'-separated (A1111's "name")
    path: Path                # absolute path (for a repo id: the id itself)
    kind: str                 # "file" | "diffusers" | "hub"
    sha256: str | None = None
    family: str | None = None
    notes: list[str] = field(default_factory=list)
    _native: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def model_name(self) -> str:
        """A1111's model_name: the name without extension."""
        return os.path.splitext(self.name)[0] if self.kind == "file" else self.name

    @property
    def short_hash(self) -> str | None:
        return short_hash(self.sha256) if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.sha256 else self.name

    @property
    def sidecar_yaml(self) -> Path | None:
        if self.kind != "file":
            return None
        yaml = self.path.with_suffix(".yaml")
        return yaml if yaml.exists() else None

    @property
    def native_size(self) -> tuple[int, int] | None:
        """(width, height) the checkpoint declares in its safetensors header (``modelspec.resolution``,
        "64x64"), or None. Only the header is read, once per file version."""
        if self.kind != "file" or self.path.suffix.lower() != ".safetensors":
            return None
        try:
            key = self.stat_key()
        except OSError:
            return None
        if self._native is None or self._native[0] != key:
            self._native = (key, read_native_size(self.path))
        return self._native[1]

    def stat_key(self) -> tuple:
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_size)


def read_native_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``modelspec.resolution`` ("WxH" or "W") from a .safetensors header, or None when absent or unreadable."""
    from .loading.state_dict import read_metadata
    try:
        value = read_metadata(os.fspath(path)).get("modelspec.resolution", "")
    except Exception:  # noqa: BLE001 - a broken file is reported when it is loaded, not while listing
        return None
    m = re.fullmatch(r"\s*(\d{2,5})\s*(?:[x×,]\s*(\d{2,5}))?\s*", str(value))
    if not m:
        return None
    width = int(m.group(1))
    return width, int(m.group(2) or width)


@dataclass
class VaeInfo:
    name: str
    path: Path
    kind: str                 # "file" | "diffusers"
    sha256: str | None = None

    @property
    def short_hash(self) -> str | None:
        return short_hash(self.sha256) if self.sha256 else None


def _folder_id(path: Path) -> str:
    """A diffusers folder has no single file to hash; it is identified by where it is."""
    return hashlib.sha256(str(path).encode()).hexdigest()


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


class Registry:
    """Scans the model folders; resolves names, titles and hashes as A1111 does."""

    def __init__(self, settings: Settings, hash_cache: HashCache | None = None):
        self.settings = settings
        self.hashes = hash_cache or HashCache(settings.cache_file)
        self.hasher = BackgroundHasher(self.hashes)
        self._lock = threading.RLock()
        self._checkpoints: dict[str, CheckpointInfo] = {}
        self._vaes: dict[str, VaeInfo] = {}
        self._watch = FolderWatch()
        self.refresh()

    # ---- scanning --------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the checkpoint and VAE folders (cheap: no file is opened)."""
        with self._lock:
            self._watch.mark(self._roots())
            self._checkpoints = self._scan_checkpoints(self.settings.ckpt_path)
            self._vaes = self._scan_vaes(self.settings.vae_path)
            for info in self._checkpoints.values():  # hashes already known cost nothing
                if info.kind == "file":
                    info.sha256 = self.hashes.get_cached(info.path, "checkpoint")

    def _roots(self) -> list[Path]:
        return [self.settings.ckpt_path, self.settings.vae_path]

    def refresh_if_changed(self) -> bool:
        """Rescan when a file was added, removed or rewritten since the last scan (a stat walk, no file read)."""
        if not self._watch.changed(self._roots()):
            return False
        self.refresh()
        return True

    def refresh_vaes(self) -> None:
        with self._lock:
            self._vaes = self._scan_vaes(self.settings.vae_path)

    @staticmethod
    def _scan_checkpoints(root: Path) -> dict[str, CheckpointInfo]:
        found: dict[str, CheckpointInfo] = {}
        if not root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            here = Path(dirpath)
            if _is_diffusers_folder(here) and here != root:
                name = here.relative_to(root).as_posix()
                found[name] = CheckpointInfo(name, here.resolve(), "diffusers")
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.lower().endswith(CKPT_EXTS) and not fn.startswith("."):
                    path = here / fn
                    name = path.relative_to(root).as_posix()
                    found[name] = CheckpointInfo(name, path.resolve(), "file")
        return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))

    @staticmethod
    def _scan_vaes(root: Path) -> dict[str, VaeInfo]:
        found: dict[str, VaeInfo] = {}
        if not root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            here = Path(dirpath)
            if (here / "config.json").is_file() and here != root:
                name = here.relative_to(root).as_posix()
                found[name] = VaeInfo(name, here.resolve(), "diffusers")
                dirnames[:] = []
                continue
            for fn in sorted(filenames):
                if fn.lower().endswith(VAE_EXTS) and not fn.startswith("."):
                    path = here / fn
                    found[path.relative_to(root).as_posix()] = VaeInfo(path.relative_to(root).as_posix(),
                                                                       path.resolve(), "file")
        return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))

    # ---- listing ---------------------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointInfo]:
        with self._lock:
            return list(self._checkpoints.values())

    def vaes(self) -> list[VaeInfo]:
        with self._lock:
            return list(self._vaes.values())

    # ---- hashing ---------------------------------------------------------------------------------
    def ensure_hash(self, info: CheckpointInfo) -> str:
        """Full sha256 of a single-file checkpoint (cached by path, mtime and size). Folders hash their path.

        Waits for the file's background hash when one is running (never hashes a file twice at once)."""
        if info.sha256:
            return info.sha256
        info.sha256 = self.hasher.get(info.path, "checkpoint") if info.kind == "file" else _folder_id(info.path)
        return info.sha256

    def ensure_vae_hash(self, info: VaeInfo) -> str:
        if not info.sha256:
            info.sha256 = self.hasher.get(info.path, "vae") if info.kind == "file" else _folder_id(info.path)
        return info.sha256

    def hash_later(self, info: CheckpointInfo | VaeInfo) -> None:
        """Hash a model file in the background; its ``sha256`` (and that of the listed entry for the same file)
        is filled in when done. Folders and repos get their id at once (nothing to read)."""
        if info.sha256 or info.kind == "hub":
            return
        if info.kind != "file":
            info.sha256 = _folder_id(info.path)
            return
        kind = "vae" if isinstance(info, VaeInfo) else "checkpoint"
        self.hasher.submit(info.path, kind).add_done_callback(lambda fut: self._hashed(info, fut))

    def _hashed(self, info: CheckpointInfo | VaeInfo, fut) -> None:
        if fut.exception() is not None:
            log.warning("Could not hash %s: %s", info.path, fut.exception())
            return
        info.sha256 = fut.result()
        with self._lock:  # a rescan meanwhile made new entries for the same files
            listed = self._vaes if isinstance(info, VaeInfo) else self._checkpoints
            for other in listed.values():
                if other.path == info.path and other.kind == "file" and not other.sha256:
                    other.sha256 = info.sha256

    # ---- resolving names -------------------------------------------------------------------------
    @staticmethod
    def _check_name(name: str, field_name: str) -> str:
        clean = name.strip()
        parts = re.split(r"[\\/]", clean)
        if os.path.isabs(clean) or ".." in parts or clean.startswith("~"):
            raise StudioError(f"{field_name} {name!r} contains a path; only names inside the model folder are "
                              "allowed.", field=field_name, fix="pass the name or title as listed by the studio")
        return clean

    def find_checkpoint(self, name: str, field_name: str = "checkpoint") -> CheckpointInfo:
        """Find by title, name, name without extension, file stem, short/legacy/full hash, or a repo id."""
        query = self._check_name(name, field_name)
        query = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", query) if not query.startswith("[") else query
        with self._lock:
            infos = list(self._checkpoints.values())
        if not infos and not _REPO_ID.match(query):
            self.refresh()
            infos = self.checkpoints()
        for info in infos:
            if query in (info.name, info.title, info.model_name, Path(info.name).name,
                         os.path.splitext(Path(info.name).name)[0]):
                return self._still_there(info)
        lowered = query.lower().strip("[]")
        if re.fullmatch(r"[0-9a-f]{8,64}", lowered):
            for info in infos:
                sha = info.sha256 or (self.hashes.get_cached(info.path, "checkpoint") if info.kind == "file" else None)
                if sha and sha.startswith(lowered):
                    return self._still_there(info)
                legacy = self.hashes.get_cached(info.path, "legacy") if info.kind == "file" else None
                if legacy and legacy == lowered:
                    return self._still_there(info)
        if _REPO_ID.match(query) and not query.lower().endswith(CKPT_EXTS):
            return CheckpointInfo(query, Path(query), "hub")
        titles = ", ".join(i.title for i in infos) or "none: the folder is empty"
        raise StudioError(f"Checkpoint {name!r} was not found in {self.settings.ckpt_path}.", field=field_name,
                          fix=f"choose one of: {titles}", status=404)

    def _still_there(self, info: CheckpointInfo) -> CheckpointInfo:
        if not info.path.exists():
            self.refresh()
            raise StudioError(f"Checkpoint {info.name!r} is no longer on disk ({info.path}).", path=str(info.path),
                              fix="put the file back or pick another checkpoint (the list was refreshed)",
                              status=404)
        return info

    def find_vae(self, name: str) -> VaeInfo:
        query = self._check_name(name, "vae")
        with self._lock:
            vaes = list(self._vaes.values())
        for info in vaes:
            if query in (info.name, Path(info.name).name, os.path.splitext(Path(info.name).name)[0]):
                if not info.path.exists():
                    self.refresh_vaes()
                    raise StudioError(f"VAE {info.name!r} is no longer on disk.", field="vae", path=str(info.path))
                return info
        names = ", ".join(v.name for v in vaes) or "none"
        raise StudioError(f"VAE {name!r} was not found in {self.settings.vae_path}.", field="vae",
                          fix=f"use Automatic, None, or one of: {names}", status=404)

    def sidecar_vae(self, info: CheckpointInfo) -> VaeInfo | None:
        """A1111's automatic VAE: <checkpoint stem>.vae.{pt,ckpt,safetensors} beside the checkpoint."""
        if info.kind != "file":
            return None
        stem = info.path.name[: -len(info.path.suffix)]
        for ext in (".vae.safetensors", ".vae.pt", ".vae.ckpt"):
            candidate = info.path.with_name(stem + ext)
            if candidate.is_file():
                return VaeInfo(candidate.name, candidate, "file")
        return None
