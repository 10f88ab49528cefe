"""A cheap "did this folder change?" test for the model libraries: stat every entry, open no file.

A library keeps the signature of its folders from its last scan; ``changed`` compares it with a fresh one, so a
file dropped in, removed, renamed or rewritten (size / mtime) is seen without rescanning headers or hashes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def folder_signature(roots: Iterable[os.PathLike | str]) -> tuple:
    """(root, [(relative path, mtime_ns, size)...]) for every root, sub-folders included (dot names skipped)."""
    out = []
    for root in roots:
        root = Path(root)
        entries: list[tuple[str, int, int]] = []
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for fn in filenames:
                    if fn.startswith("."):
                        continue
                    path = os.path.join(dirpath, fn)
                    try:
                        st = os.stat(path)
                    except OSError:     # vanished between listing and stat: the next check sees it
                        continue
                    entries.append((os.path.relpath(path, root), st.st_mtime_ns, st.st_size))
        out.append((str(root.resolve()) if root.exists() else str(root), tuple(sorted(entries))))
    return tuple(out)


class FolderWatch:
    """Remembers the signature of some folders; ``changed()`` is True once per change (then re-armed)."""

    def __init__(self) -> None:
        self._signature: tuple | None = None

    def mark(self, roots: Iterable[os.PathLike | str]) -> None:
        """Record the folders as scanned now (call before scanning, so a change during the scan is seen next)."""
        self._signature = folder_signature(roots)

    def changed(self, roots: Iterable[os.PathLike | str]) -> bool:
        return folder_signature(roots) != self._signature
