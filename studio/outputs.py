"""Saving images the A1111 way: outputs/<mode>-images/YYYY-MM-DD/NNNNN-<file name pattern>.png, written atomically.

The pattern is A1111's (``[seed]``, ``[prompt_words]``, ``[datetime<%Y%m%d>]``...: ``studio.filenames``)."""
from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

from PIL import Image

from .filenames import NameContext, file_stem
from .infotext import png_text

_COUNTER = re.compile(r"^(\d{5,})(?=[-.]|$)")


class OutputWriter:
    """Numbers files per folder continuing from the highest number already there (A1111 behaviour)."""

    def __init__(self, outdir: str | os.PathLike):
        self.outdir = Path(outdir)
        self._lock = threading.Lock()

    def folder(self, mode: str, when: float | None = None, kind: str = "images") -> Path:
        return self.outdir / f"{mode}-{kind}" / time.strftime("%Y-%m-%d", time.localtime(when))

    @staticmethod
    def next_number(folder: Path) -> int:
        highest = -1
        if folder.is_dir():
            for entry in os.scandir(folder):
                m = _COUNTER.match(entry.name)
                if m:
                    highest = max(highest, int(m.group(1)))
        return highest + 1

    def save(self, image: Image.Image, *, mode: str, seed: int, infotext: str, kind: str = "images",
             pattern: str | None = None, context: NameContext | None = None) -> Path:
        """Write one PNG with its ``parameters`` chunk; a crash mid-write never leaves a half file.

        ``pattern``: the file name pattern after the counter (default ``[seed]``), filled from ``context``.
        ``kind`` "grids" writes to A1111's ``<mode>-grids`` folder (named ``NNNNN-grid.png`` there)."""
        with self._lock:
            folder = self.folder(mode, kind=kind)
            folder.mkdir(parents=True, exist_ok=True)
            if kind == "grids":
                pattern, context = "grid", None
            elif context is None:
                context = NameContext(seed=seed, width=image.width, height=image.height)
            max_length = _name_max(folder)
            number = self.next_number(folder)
            for _ in range(500):   # a same-named file can exist when the pattern has no counter-like part
                path = folder / f"{file_stem(number, pattern, context, max_length)}.png"
                if not path.exists():
                    break
                number += 1
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG", pnginfo=png_text(infotext))
            os.replace(tmp, path)
            return path


def _name_max(folder: Path) -> int:
    try:
        return os.statvfs(folder).f_namemax
    except (AttributeError, OSError):   # no statvfs on Windows: its usual limit
        return 255
