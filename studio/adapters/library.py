"""The LoRA folders (``models/Lora``, ``models/LyCORIS``): cheap scan from headers, parsed files in an LRU cache.

Scanning reads safetensors headers only. Parsing (reading tensors) happens on first use and is cached under a
RAM byte budget, so re-activating a set of LoRAs never reads a file again (``reads`` counts file reads).
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StudioError
from ..folders import FolderWatch
from ..hashes import HashCache, short_hash
from .keys import family_hint
from .lora_files import LORA_EXTS, LoraFile, file_ident, header_info, load_lora_file

PREVIEW_EXTS = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_CACHE_MB = 1024
MAX_TRIGGER_WORDS = 20


@dataclass
class LoraInfo:
    """One LoRA file on disk, as the Extra networks panel and /sdapi/v1/loras show it."""

    name: str                     # file stem (A1111's name for <lora:name:...>)
    alias: str                    # ss_output_name, or the name
    path: Path
    metadata: dict[str, str]
    family: str | None
    preview: Path | None = None
    trigger_words: list[str] = field(default_factory=list)
    folder: str = ""              # sub-folder relative to its root ("" at top level), for the UI's tree

    def to_api(self) -> dict:
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


def find_preview(path: Path) -> Path | None:
    """``name.preview.png`` or ``name.png`` (also .jpg / .jpeg / .webp) next to the file."""
    for stem in (path.stem + ".preview", path.stem):
        for ext in PREVIEW_EXTS:
            p = path.with_name(stem + ext)
            if p.is_file():
                return p
    return None


def trigger_words(meta: dict, sidecar: dict | None = None) -> list[str]:
    """Activation text: A1111's sidecar ``name.json`` "activation text", ``modelspec.trigger_phrase``, then the
    most frequent training tags from ``ss_tag_frequency`` (counts summed over dataset folders)."""
    words: list[str] = []
    for phrase in ((sidecar or {}).get("activation text"), meta.get("modelspec.trigger_phrase")):
        if isinstance(phrase, str) and phrase.strip():
            words.append(phrase.strip())
    try:
        freq = json.loads(meta.get("ss_tag_frequency") or "{}")
    except ValueError:
        freq = {}
    counts: dict[str, int] = {}
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    tag = str(tag).strip()
                    if tag and isinstance(n, (int, float)):
                        counts[tag] = counts.get(tag, 0) + int(n)
    for tag, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if tag not in words:
            words.append(tag)
    return words[:MAX_TRIGGER_WORDS]


def _sidecar(path: Path) -> dict:
    p = path.with_suffix(".json")
    try:
        data = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) else {}


def scan_files(roots: list[Path], exts: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """(root, file) for every file with one of ``exts`` under the roots, sub-folders included, sorted."""
    out = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.lower().endswith(exts) and not fn.startswith("."):
                    out.append((root, Path(dirpath) / fn))
    return out


class LoraLibrary:
    """LoRAs on disk and the parsed-file cache. ``hash_cache`` gives A1111's addnet hashes."""

    def __init__(self, settings, hash_cache: HashCache | None = None, cache_bytes: int | None = None):
        self.settings = settings
        self.hashes = hash_cache or HashCache(None)
        mb = getattr(settings, "lora_cache_mb", 0) or DEFAULT_CACHE_MB
        self.cache_bytes = cache_bytes if cache_bytes is not None else mb << 20
        self._lock = threading.RLock()
        self._entries: dict[str, LoraInfo] = {}
        self._cache: OrderedDict[str, LoraFile] = OrderedDict()
        self.reads = 0                        # files actually read and parsed (tests / benchmarks look)
        self.errors: dict[str, str] = {}      # path -> message for files that could not be scanned
        self._watch = FolderWatch()
        self.refresh()

    # ---- scanning ------------------------------------------------------------------------------------------
    def roots(self) -> list[Path]:
        roots = [Path(self.settings.lora_path)]
        lyco = Path(self.settings.lycoris_path)
        if lyco.resolve() != roots[0].resolve():
            roots.append(lyco)
        return roots

    def refresh(self) -> None:
        """Rescan the folders (headers only). The first file of a name wins, as in A1111."""
        self._watch.mark(self.roots())
        entries: dict[str, LoraInfo] = {}
        errors: dict[str, str] = {}
        for root, path in scan_files(self.roots(), LORA_EXTS):
            if path.stem in entries:
                continue
            try:
                meta, shapes = header_info(path)
            except StudioError as e:
                errors[str(path)] = str(e)
                continue
            rel = path.parent.relative_to(root).as_posix()
            entries[path.stem] = LoraInfo(
                name=path.stem, alias=meta.get("ss_output_name") or path.stem, path=path, metadata=meta,
                family=family_hint(meta, shapes), preview=find_preview(path),
                trigger_words=trigger_words(meta, _sidecar(path)), folder="" if rel == "." else rel)
        with self._lock:
            self._entries, self.errors = entries, errors

    def refresh_if_changed(self) -> bool:
        """Rescan when a file (LoRA, preview, sidecar) was added, removed or rewritten since the last scan."""
        if not self._watch.changed(self.roots()):
            return False
        self.refresh()
        return True

    def list(self) -> list[dict]:
        """GET /sdapi/v1/loras: ``[{name, alias, path, metadata}]``."""
        with self._lock:
            return [e.to_api() for e in self._entries.values()]

    def entries(self) -> list[LoraInfo]:
        with self._lock:
            return list(self._entries.values())

    def find(self, name: str) -> LoraInfo | None:
        """By name (file stem), then alias, then sub-folder path, then case-insensitively."""
        with self._lock:
            if name in self._entries:
                return self._entries[name]
            entries = list(self._entries.values())
        for match in (lambda e: e.alias == name,
                      lambda e: f"{e.folder}/{e.name}" == name.replace("\\", "/"),
                      lambda e: e.name.lower() == name.lower() or e.alias.lower() == name.lower()):
            hit = next((e for e in entries if match(e)), None)
            if hit:
                return hit
        return None

    # ---- hashes --------------------------------------------------------------------------------------------
    def hash(self, entry: LoraInfo | str) -> str:
        """A1111's short LoRA hash (12 hex of the addnet hash), cached per file version."""
        info = self._info(entry)
        return short_hash(self.hashes.get_or_compute(info.path, "lora"), 12)

    # ---- parsed files --------------------------------------------------------------------------------------
    def _info(self, entry: LoraInfo | str) -> LoraInfo:
        if isinstance(entry, LoraInfo):
            return entry
        info = self.find(entry)
        if info is None:
            raise StudioError(f"LoRA '{entry}' not found in {', '.join(map(str, self.roots()))}.",
                              field="prompt", fix="check the name in <lora:name:weight>, or refresh the list.")
        return info

    def load(self, entry: LoraInfo | str) -> LoraFile:
        """The parsed file (from the cache when this version of it was parsed before)."""
        info = self._info(entry)
        ident = file_ident(info.path)
        with self._lock:
            lf = self._cache.get(ident)
            if lf is not None:
                self._cache.move_to_end(ident)
                return lf
        lf = load_lora_file(info.path)
        lf.name = info.name
        with self._lock:
            self.reads += 1
            self._cache[ident] = lf
            self._evict(keep=ident)
        return lf

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(lf.nbytes for lf in self._cache.values())

    def _evict(self, keep: str) -> None:
        while self.cached_bytes() > self.cache_bytes and len(self._cache) > 1:
            oldest = next(iter(self._cache))
            if oldest == keep:
                break
            del self._cache[oldest]

    def resolve(self, tags) -> tuple[list[tuple[LoraFile, float, float]], list[str]]:
        """``[(name, te_weight, unet_weight)]`` -> (active list for AdapterPatcher.apply, warnings).

        Unknown names and unreadable files become warnings: the image is still made (A1111 behaviour)."""
        active, warnings, missing = [], [], []
        wanted = [t for t in tags if not (t[1] == 0 and t[2] == 0)]
        if any(self.find(name) is None for name, _, _ in wanted):
            self.refresh()  # a file added since the last scan (A1111 rescans before giving up on a name)
        for name, te, un in wanted:
            info = self.find(name)
            if info is None:
                missing.append(name)
                continue
            try:
                active.append((self.load(info), float(te), float(un)))
            except StudioError as e:
                warnings.append(f"LoRA '{name}' could not be read: {e}")
        if missing:
            warnings.insert(0, f"Networks not found: {', '.join(missing)}")
        return active, warnings

    @staticmethod
    def infotext_hashes(pairs: list[tuple[str, str]]) -> str:
        """``[(name as written in the prompt, 12-hex hash)]`` -> the ``Lora hashes`` / ``TI hashes`` value
        (unquoted; infotext quotes it). ``:`` and ``,`` are dropped from names, as in A1111."""
        return ", ".join(f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in pairs)
