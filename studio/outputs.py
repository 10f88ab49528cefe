"""Saving images the A1111 way: outputs/<mode>-images/YYYY-MM-DD/NNNNN-SEED.png, written atomically."""
from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

from PIL import Image

from .infotext import png_text

_COUNTER = re.compile(r"^(\d{5,})-")


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

    def save(self, image: Image.Image, *, mode: str, seed: int, infotext: str, kind: str = "images") -> Path:
        """Write one PNG with its ``parameters`` chunk; a crash mid-write never leaves a half file.

        ``kind`` "grids" writes to A1111's ``<mode>-grids`` folder (named ``NNNNN-grid.png`` there)."""
        with self._lock:
            folder = self.folder(mode, kind=kind)
            folder.mkdir(parents=True, exist_ok=True)
            name = "grid" if kind == "grids" else str(seed)
            path = folder / f"{self.next_number(folder):05d}-{name}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG", pnginfo=png_text(infotext))
            os.replace(tmp, path)
            return path
