"""Textual-inversion embeddings from ``models/embeddings`` (sub-folders too).

Formats: A1111 ``.pt`` (``string_to_param: {"*": [n, dim]}``), ``.safetensors`` with ``emb_params`` or a single
``{token: [n, dim]}`` (diffusers), SDXL ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``. The prompt token is the
file stem. ``Embedding.vectors`` is keyed by the Components attribute of the text encoder each tensor is for:
``"text_encoder"`` (CLIP-L of SD1 / SDXL, OpenCLIP-H of SD2) and ``"text_encoder_2"`` (SDXL's OpenCLIP-bigG);
the prompt encoder puts ``vectors[attr]`` at the ``n_vectors`` token positions where the name appears.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .. import families
from ..errors import StudioError
from ..folders import FolderWatch
from ..hashes import HashCache, short_hash
from ..lazy import torch
from ..loading.state_dict import _read_pickle, read_state_dict
from .library import scan_files
from .lora_files import file_ident

EMBEDDING_EXTS = (".pt", ".safetensors", ".bin")


@dataclass
class EmbeddingFile:
    """A parsed embedding file. ``parts``: {"single": t} for one-encoder files, {"clip_l", "clip_g"} for SDXL."""

    name: str
    path: Path
    parts: dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def n_vectors(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    @property
    def shape(self) -> int:
        """A1111's ``shape``: the vector width (CLIP-L's for SDXL files)."""
        return int(self.parts.get("clip_l", next(iter(self.parts.values()))).shape[-1])

    def api_dict(self) -> dict:
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.n_vectors}


@dataclass
class Embedding:
    """An embedding fitted to the loaded model: what the prompt encoder needs."""

    name: str                                  # the token to look for in prompts (file stem)
    n_vectors: int
    vectors: dict[str, torch.Tensor]           # "text_encoder" / "text_encoder_2" -> [n_vectors, width]
    path: Path
    file: EmbeddingFile = field(repr=False, default=None)


def parse_embedding(data: dict, name: str, path: Path) -> EmbeddingFile:
    """Any supported layout -> EmbeddingFile; StudioError naming the file if it holds no embedding."""
    def bad(why: str) -> StudioError:
        return StudioError(f"Embedding file {path} {why}.", path=str(path),
                           fix="use an A1111 / diffusers textual-inversion file.")

    parts: dict[str, torch.Tensor]
    if isinstance(data.get("string_to_param"), dict):
        params = [v for v in data["string_to_param"].values() if isinstance(v, torch.Tensor)]
        if len(params) != 1:
            raise bad("has more than one term in string_to_param")
        parts = {"single": params[0]}
    elif "clip_l" in data or "clip_g" in data:
        parts = {k: data[k] for k in ("clip_l", "clip_g") if isinstance(data.get(k), torch.Tensor)}
    elif isinstance(data.get("emb_params"), torch.Tensor):
        parts = {"single": data["emb_params"]}
    else:
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise bad(f"holds {len(tensors)} tensors and none of the known keys")
        parts = {"single": tensors[0]}
    if not parts:
        raise bad("holds no vectors")
    parts = {k: (v[None] if v.ndim == 1 else v).detach().float().cpu() for k, v in parts.items()}
    if any(v.ndim != 2 for v in parts.values()):
        raise bad("holds vectors that are not 2-D [n_vectors, width]")
    if len({v.shape[0] for v in parts.values()}) > 1:
        raise bad("has clip_l and clip_g parts of different lengths")

    def meta(key):
        v = data.get(key)
        return v if isinstance(v, (int, str)) else None
    return EmbeddingFile(name=name, path=path, parts=parts, step=meta("step"),
                         sd_checkpoint=meta("sd_checkpoint"), sd_checkpoint_name=meta("sd_checkpoint_name"))


def load_embedding_file(path: str | os.PathLike) -> EmbeddingFile:
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        data = read_state_dict(os.fspath(path))
    else:  # A1111 .pt keeps nested dicts (string_to_param) that read_state_dict would flatten away
        data = _read_pickle(os.fspath(path))
        if not isinstance(data, dict):
            raise StudioError(f"Embedding file {path} holds a {type(data).__name__}, not a dictionary.",
                              path=str(path), fix="use an A1111 / diffusers textual-inversion file.")
    return parse_embedding(data, path.stem, path)


def _width(te) -> int | None:
    return None if te is None else int(te.config.hidden_size)


def fit(ef: EmbeddingFile, components) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(vectors by encoder attribute, "") if the file fits the model, else (None, reason). A family whose
    encoders have named parts (SDXL: clip_l, clip_g) needs each of them; others take a single-vector file."""
    spec = components.spec
    fam = spec.short
    encoders = [te for te in spec.text_encoders if getattr(components, te.attr, None) is not None]
    named = [te for te in encoders if te.embedding_part != "single"]
    if named:
        need = " and ".join(te.embedding_part for te in named)
        if "single" in ef.parts:
            return None, f"made for one text encoder (width {ef.shape}); {fam} needs {need} parts"
        out = {}
        for te in named:
            if te.embedding_part not in ef.parts:
                return None, f"has no {te.embedding_part} part; {fam} needs {need} parts"
            t, want = ef.parts[te.embedding_part], _width(getattr(components, te.attr))
            if t.shape[1] != want:
                return None, f"{te.embedding_part} width {t.shape[1]} does not fit the {fam} text encoder ({want})"
            out[te.attr] = t
        return out, ""
    if "single" not in ef.parts:
        other = families.from_embedding({k: int(v.shape[1]) for k, v in ef.parts.items()})
        made = f"an {other.short} embedding" if other else "an embedding of another family"
        return None, f"is {made} ({' / '.join(ef.parts)}); the loaded checkpoint is {fam}"
    t, w1 = ef.parts["single"], _width(components.text_encoder)
    if t.shape[1] != w1:
        return None, f"width {t.shape[1]} does not fit the {fam} text encoder ({w1})"
    return {"text_encoder": t}, ""



class EmbeddingLibrary:
    """Embedding files on disk, parsed lazily and cached per file version (they are small)."""

    def __init__(self, settings, hash_cache: HashCache | None = None):
        self.settings = settings
        self.hashes = hash_cache or HashCache(None)
        self._lock = threading.RLock()
        self._paths: dict[str, Path] = {}
        self._cache: dict[str, EmbeddingFile] = {}
        self._errors: dict[str, str] = {}     # name -> why the file could not be read
        self.reads = 0
        self._watch = FolderWatch()
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folder (sub-folders too). The first file with a given stem wins."""
        self._watch.mark([self.settings.embeddings_path])
        paths: dict[str, Path] = {}
        root = Path(self.settings.embeddings_path)
        for _, path in scan_files([root], EMBEDDING_EXTS):
            paths.setdefault(path.stem, path)
        with self._lock:
            self._paths = paths
            self._errors = {}

    def refresh_if_changed(self) -> bool:
        """Rescan when a file was added, removed or rewritten since the last scan (a stat walk)."""
        if not self._watch.changed([self.settings.embeddings_path]):
            return False
        self.refresh()
        return True

    def names(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def path_of(self, name: str) -> Path | None:
        """The file of the embedding named ``name`` (its stem), or None."""
        with self._lock:
            return self._paths.get(name)

    def file(self, name: str) -> EmbeddingFile | None:
        """The parsed file for a name (None if unreadable: see ``errors``)."""
        with self._lock:
            path = self._paths.get(name)
        if path is None:
            return None
        try:
            ident = file_ident(path)
        except OSError as e:
            with self._lock:
                self._errors[name] = f"Embedding file {path} could not be read: {e.strerror or e}."
            return None
        with self._lock:
            if ident in self._cache:
                return self._cache[ident]
        try:
            ef = load_embedding_file(path)
        except Exception as e:  # noqa: BLE001 - one bad file is listed with its error, never fails the list
            message = str(e) if isinstance(e, StudioError) else \
                f"Embedding file {path} could not be read ({type(e).__name__}: {e})."
            with self._lock:
                self._errors[name] = message
            return None
        with self._lock:
            self.reads += 1
            self._cache[ident] = ef
        return ef

    def error(self, name: str) -> str | None:
        """Why the file of ``name`` could not be read (None if it could, or was not tried yet)."""
        with self._lock:
            return self._errors.get(name)

    def for_model(self, components) -> tuple[dict[str, Embedding], dict[str, str]]:
        """(loaded: name -> Embedding fitted to ``components``, skipped: name -> reason)."""
        self.refresh_if_changed()
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, str] = {}
        for name in self.names():
            ef = self.file(name)
            if ef is None:
                skipped[name] = self._errors.get(name, "could not be read")
                continue
            vectors, reason = fit(ef, components)
            if vectors is None:
                skipped[name] = reason
            else:
                loaded[name] = Embedding(name, ef.n_vectors, vectors, ef.path, ef)
        return loaded, skipped

    def api_dict(self, components) -> dict:
        """GET /sdapi/v1/embeddings: ``{"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape,
        vectors}}, "skipped": {...}}`` (unreadable files are listed as skipped with zero vectors and their
        ``error``)."""
        loaded, skipped = self.for_model(components) if components is not None else ({}, {n: "" for n in
                                                                                        self.names()})
        out = {"loaded": {n: e.file.api_dict() for n, e in loaded.items()}, "skipped": {}}
        for n in skipped:
            ef = self.file(n)
            out["skipped"][n] = ef.api_dict() if ef else {
                "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": 0,
                "error": self.error(n) or "could not be read"}
        return out

    def hash(self, name: str) -> str | None:
        """TI hash for infotext: full-file sha256, 12 hex (None if there is no such embedding)."""
        with self._lock:
            path = self._paths.get(name)
        return short_hash(self.hashes.get_or_compute(path, "embedding"), 12) if path else None
