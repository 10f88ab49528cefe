"""Atomic file writes (temp file in the same folder + os.replace): readers never see half a file."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path next to ``path``; on success it replaces ``path`` at once, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
