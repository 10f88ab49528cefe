"""Which server folders a request may name: one rule for the REST API and the UI's handlers.

A path that comes from a request (a REST body, a tab's text box, Gradio's API) must resolve, after ``~`` and
symlinks, inside one of the studio's folders: the models folder and every model folder set on its own
(``--ckpt-dir``, ``--lora-dir``... may point into an A1111 install), ``data_dir`` (training runs and datasets
live there) and ``outdir``. Anything else is a 422 naming the field and the allowed folders. File names a request
gives (``output_name``...) must be plain names. Python callers and ``launch.py --train`` (the user's own shell) are
not confined: only request handlers call this.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from .errors import StudioError

# Settings attributes that are folders a request may name (the model folders are the derived *_path ones, so a
# folder set on its own counts even when it lies outside models_dir)
ROOT_SETTINGS = ("models_dir", "ckpt_path", "vae_path", "lora_path", "lycoris_path", "embeddings_path",
                 "controlnet_path", "annotators_path", "data_dir", "outdir")

_BAD_NAME = re.compile(r"[\\/:*?\"<>|\x00-\x1f]")


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def allowed_roots(settings, *extra: str | os.PathLike) -> tuple[Path, ...]:
    """The resolved folders of ``settings`` (see ``ROOT_SETTINGS``) plus ``extra``, without duplicates."""
    out: list[Path] = []
    for folder in [getattr(settings, name, None) for name in ROOT_SETTINGS] + list(extra):
        if folder is None or str(folder) == "":
            continue
        root = _resolve(folder)
        if root not in out:
            out.append(root)
    return tuple(out)


def describe(roots: Iterable[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "none (no folders are configured)"


def confine(path: str | os.PathLike, roots: Iterable[Path], field: str) -> Path:
    """``path`` resolved (``~``, ``..``, symlinks), if it lies inside one of ``roots``; else a 422 naming
    ``field``. Relative paths are relative to the working directory (the folder that holds ``launch.py``)."""
    roots = tuple(roots)
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or not text.strip():
        raise StudioError(f"{field} is empty.", field=field, fix=f"give a path inside {describe(roots)}")
    try:
        resolved = _resolve(text)
    except (OSError, ValueError, RuntimeError) as exc:   # a NUL byte, a symlink loop, an unknown ~user
        raise StudioError(f"{field} {text!r} is not a usable path ({exc}).", field=field,
                          fix=f"give a path inside {describe(roots)}") from None
    if any(resolved.is_relative_to(root) for root in roots):
        return resolved
    raise StudioError(f"{field} {text!r} is outside the folders the studio may use (checked after following "
                      "symlinks).", field=field,
                      fix=f"use a path inside one of: {describe(roots)} (set --models-dir, --ckpt-dir, "
                          "--lora-dir, --data-dir or --outdir to add a folder)")


def plain_name(name: str, field: str) -> str:
    """``name`` stripped, if it is a plain file name (no folders, no ``..``, not hidden); else a 422."""
    clean = name.strip() if isinstance(name, str) else ""
    if not clean or _BAD_NAME.search(clean) or clean.startswith(".") or ".." in clean:
        raise StudioError(f"{field} {name!r} is not a plain file name.", field=field,
                          fix="use letters, digits, spaces, '-', '_' and '.' only (no folders, no '..')")
    return clean
