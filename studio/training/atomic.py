"""Atomic file writes (temp file in the same folder + os.replace): readers never see half a file."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path next to ``path``; on success it replaces ``path`` at once, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    mode = os.stat(tmp).st_mode & 0o777      # 0666 minus the umask, as the kernel applied it
    try:
        yield Path(tmp)
        # writers that replace the file themselves (safetensors 0.8 writes 0600 temp files) lose the mode
        if os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_temp(path: Path) -> str:
    """An empty, new ``.<name>.<random>.tmp`` beside ``path``, created 0666 minus the umask like any file the
    studio writes (``mkstemp`` would make it 0600, and the finished LoRA with it: other users and services
    sharing models/ could not read it)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {path}")


def write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """``writer(tmp_path)`` writes the file; it appears at ``path`` only when complete."""
    with atomic_path(path) as tmp:
        writer(os.fspath(tmp))
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_with(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data) -> Path:
    return write_text(path, json.dumps(data, indent=1, sort_keys=True))


def save_image(path: str | os.PathLike, image) -> Path:
    return write_with(path, lambda p: image.save(p, format="PNG"))
