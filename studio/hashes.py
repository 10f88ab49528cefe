"""A1111 model hashes (modules/hashes.py, sd_models.py, networks) and a persistent cache of them.

Kinds: "checkpoint", "vae", "embedding", "sha256" -> full-file sha256; "addnet" / "lora" -> kohya addnet hash of
a safetensors file (full sha256 for other formats, as A1111 does); "legacy" -> the old 8-hex model hash; "title" ->
that, or the short sha256 where it would hash nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

_BLOCK = 1024 * 1024
_MAX_HEADER = 100 * 1024 * 1024  # safetensors headers are small; larger means a broken or foreign file


def sha256_file(path: str | os.PathLike) -> str:
    """Full-file sha256 (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def short_hash(sha: str, length: int = 10) -> str:
    """The short form A1111 shows: 10 hex digits for models and VAEs (12 for LoRAs and embeddings)."""
    return sha[:length]


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old model hash: sha256 of the 0x10000 bytes at offset 0x100000, 8 hex digits.

    A file shorter than that hashes whatever lies there (nothing at all for tiny files), like A1111."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def title_model_hash(path: str | os.PathLike) -> str:
    """The 8-hex hash for a ``name [hash]`` title: A1111's old model hash (what the ControlNet extension shows),
    except for a file too short to reach its window, where that hash is sha256 of nothing (e3b0c442) for every
    file; such files get the first 8 hex of their full sha256 instead, so titles still tell them apart."""
    if os.path.getsize(path) <= 0x100000:
        return sha256_file(path)[:8]
    return legacy_model_hash(path)


def _safetensors_header_len(f) -> int:
    raw = f.read(8)
    if len(raw) < 8:
        return -1  # too short to be safetensors: there is no header to skip
    return struct.unpack("<Q", raw)[0]


def safetensors_metadata(path: str | os.PathLike) -> dict:
    """The ``__metadata__`` dict of a safetensors file ({} when absent or unreadable)."""
    try:
        with open(path, "rb") as f:
            n = _safetensors_header_len(f)
            if n <= 0 or n > _MAX_HEADER:
                return {}
            header = json.loads(f.read(n).decode("utf-8"))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def addnet_hash_raw(path: str | os.PathLike) -> str:
    """kohya "addnet" hash: sha256 of everything after the safetensors header (the tensor bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = _safetensors_header_len(f)
        f.seek(max(n, 0) + 8)
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def addnet_hash(path: str | os.PathLike) -> str:
    """The hash A1111 gives a LoRA (full hex; its short form is 12 digits).

    The file's ``sshs_model_hash`` metadata wins when present (A1111 trusts it); non-safetensors files get the
    full-file sha256 as in A1111's networks code."""
    if str(path).lower().endswith(".safetensors"):
        given = safetensors_metadata(path).get("sshs_model_hash")
        if isinstance(given, str) and given.strip():
            return given.strip()
        return addnet_hash_raw(path)
    return sha256_file(path)


_KINDS = {
    "checkpoint": sha256_file, "vae": sha256_file, "embedding": sha256_file, "sha256": sha256_file,
    "controlnet": sha256_file, "addnet": addnet_hash, "lora": addnet_hash, "legacy": legacy_model_hash,
    "title": title_model_hash,
}


def compute_hash(path: str | os.PathLike, kind: str = "checkpoint") -> str:
    try:
        fn = _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown hash kind {kind!r}; use one of {', '.join(sorted(_KINDS))}") from None
    return fn(path)


class HashCache:
    """Hashes by kind + absolute path, valid while the file's mtime and size are unchanged.

    Thread-safe; persisted as JSON, written atomically (temp file + os.replace) after every new hash so a crash
    never leaves a half-written cache. A missing or corrupt cache file just starts empty.
    """

    VERSION = 1

    def __init__(self, cache_file: str | os.PathLike | None):
        self.cache_file = Path(cache_file) if cache_file else None
        self._lock = threading.RLock()
        self._entries: dict[str, dict] = self._load()

    @staticmethod
    def _key(path: str | os.PathLike, kind: str) -> str:
        return f"{kind}:{os.path.abspath(os.fspath(path))}"

    def _load(self) -> dict[str, dict]:
        if not self.cache_file or not self.cache_file.is_file():
            return {}
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
            entries = data.get("hashes", {}) if isinstance(data, dict) else {}
            return {k: v for k, v in entries.items() if isinstance(v, dict) and "sha256" in v}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        if not self.cache_file:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"version": self.VERSION, "hashes": self._entries}, indent=1, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=self.cache_file.name + ".", suffix=".tmp", dir=self.cache_file.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.cache_file)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @staticmethod
    def _stamp(path: str | os.PathLike) -> tuple[float, int]:
        st = os.stat(path)
        return st.st_mtime, st.st_size

    def get_cached(self, path: str | os.PathLike, kind: str = "checkpoint") -> str | None:
        """The cached hash if still valid for the file as it is now, else None (never reads the file)."""
        try:
            mtime, size = self._stamp(path)
        except OSError:
            return None
        with self._lock:
            entry = self._entries.get(self._key(path, kind))
        if entry and entry.get("mtime") == mtime and entry.get("size") == size:
            return entry["sha256"]
        return None

    def get_or_compute(self, path: str | os.PathLike, kind: str = "checkpoint") -> str:
        """Cached hash, or compute (outside the lock, so other files are not held up), store and persist it."""
        cached = self.get_cached(path, kind)
        if cached is not None:
            return cached
        mtime, size = self._stamp(path)
        value = compute_hash(path, kind)
        if self._stamp(path) != (mtime, size):
            return value  # the file changed while we read it: do not cache a hash of a moving target
        with self._lock:
            self._entries[self._key(path, kind)] = {"mtime": mtime, "size": size, "sha256": value}
            self._save()
        return value

    def put(self, path: str | os.PathLike, kind: str, value: str) -> None:
        """Record a hash computed elsewhere (e.g. while the file was written) for the file as it is now."""
        mtime, size = self._stamp(path)
        with self._lock:
            self._entries[self._key(path, kind)] = {"mtime": mtime, "size": size, "sha256": value}
            self._save()

    def forget(self, path: str | os.PathLike, kind: str | None = None) -> None:
        """Drop cached hashes of a file (all kinds when kind is None)."""
        with self._lock:
            if kind is not None:
                removed = self._entries.pop(self._key(path, kind), None) is not None
            else:
                suffix = ":" + os.path.abspath(os.fspath(path))
                keys = [k for k in self._entries if k.endswith(suffix)]
                for k in keys:
                    del self._entries[k]
                removed = bool(keys)
            if removed:
                self._save()


class BackgroundHasher:
    """Hashes files on one daemon thread (started on demand, gone when idle), so listing or loading a model never
    waits seconds per GB. A foreground :meth:`get` waits for the file's run in flight, takes the file over while
    it is only queued, or hashes it at once; no file is ever hashed twice at the same time.
    """

    def __init__(self, cache: HashCache):
        self.cache = cache
        self._cond = threading.Condition()
        self._queued: dict[str, tuple[str, str, Future]] = {}   # insertion order = order of hashing
        self._running: dict[str, Future] = {}
        self._thread: threading.Thread | None = None

    def submit(self, path: str | os.PathLike, kind: str = "checkpoint") -> Future:
        """A future of the file's hash: done at once when it is cached, else queued for the background thread."""
        key = HashCache._key(path, kind)
        with self._cond:
            fut = self._running.get(key) or (self._queued[key][2] if key in self._queued else None)
            if fut is not None:
                return fut
            fut = Future()
            cached = self.cache.get_cached(path, kind)
            if cached is not None:
                fut.set_result(cached)
                return fut
            self._queued[key] = (os.fspath(path), kind, fut)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="studio-hash", daemon=True)
                self._thread.start()
        return fut

    def get(self, path: str | os.PathLike, kind: str = "checkpoint") -> str:
        """The file's hash now (raises OSError like :meth:`HashCache.get_or_compute`)."""
        cached = self.cache.get_cached(path, kind)
        if cached is not None:
            return cached
        key = HashCache._key(path, kind)
        with self._cond:
            fut = self._running.get(key)
            mine = fut is None
            if mine:
                queued = self._queued.pop(key, None)
                fut = queued[2] if queued is not None else Future()
                self._running[key] = fut
        if mine:
            self._compute(key, os.fspath(path), kind, fut)
        return fut.result()

    def _compute(self, key: str, path: str, kind: str, fut: Future) -> None:
        try:
            value = self.cache.get_or_compute(path, kind)
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the future
            fut.set_exception(exc)
        else:
            fut.set_result(value)
        finally:
            with self._cond:
                self._running.pop(key, None)

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._queued:
                    self._thread = None
                    return
                key = next(iter(self._queued))
                path, kind, fut = self._queued.pop(key)
                self._running[key] = fut
            self._compute(key, path, kind, fut)
