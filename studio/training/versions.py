"""Dataset versions: what a dataset folder held each time the studio saw it change, and which runs read which.

A version is a manifest ``{relative path: {"sha256", "caption", "size", "mtime_ns"}}`` of the images training
reads. The studio records one whenever it sees the folder's content differ from the last version (an import, a
picture sent from a gallery, saved captions, a rescan, a run queued); a run's version is also written into its
run folder (``dataset.json``), so what a LoRA was trained on stays known after the folder changes again.

Versions record, they do not freeze: the images are not copied (a dataset of 4 000 photos would be stored twice).
To keep an old version trainable, import it as a dataset of its own. The versions of a folder live in
``<data>/dataset_versions/``, never in the user's folder.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

from .atomic import write_text
from .dataset import DatasetScan

RUN_FILE = "dataset.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def manifest(root: Path, scan: DatasetScan, known: dict | None = None) -> dict[str, dict]:
    """The content of a scanned folder; a file whose size and mtime match ``known``'s entry is not re-hashed."""
    known = known or {}
    out = {}
    for item in scan.items:
        rel = item.path.resolve().relative_to(root.resolve()).as_posix()
        st = item.path.stat()
        old = known.get(rel) or {}
        same = old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        out[rel] = {"sha256": old["sha256"] if same else file_sha256(item.path), "caption": item.caption,
                    "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def changes(old: dict, new: dict) -> dict[str, int]:
    """How ``new`` differs from ``old``: images added, removed, replaced, captions changed."""
    both = old.keys() & new.keys()
    return {"added": len(new.keys() - old.keys()), "removed": len(old.keys() - new.keys()),
            "replaced": sum(old[k]["sha256"] != new[k]["sha256"] for k in both),
            "recaptioned": sum(old[k]["caption"] != new[k]["caption"] for k in both)}


def _same(a: dict, b: dict) -> bool:
    return {k: (v["sha256"], v["caption"]) for k, v in a.items()} == \
        {k: (v["sha256"], v["caption"]) for k, v in b.items()}


class DatasetVersions:
    """The versions of every dataset folder the studio has seen, one JSON file per folder."""

    def __init__(self, store: Path):
        self.store = Path(store)
        self._lock = threading.Lock()        # two pages recording the same folder at once

    def _file(self, root: Path) -> Path:
        root = root.resolve()
        return self.store / f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}.json"

    def versions(self, root: str | Path) -> list[dict]:
        """Oldest first: ``{"version", "time", "images", "files", "changes", "runs"}``."""
        path = self._file(Path(root))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []     # none yet (a damaged file starts the history again rather than failing a rescan)
        return data.get("versions", []) if isinstance(data, dict) else []

    def record(self, root: str | Path, scan: DatasetScan, *, run: str | None = None) -> dict:
        """The version matching the folder's content now (a new one if it changed); ``run`` is added to it."""
        root = Path(root)
        with self._lock:
            versions = self.versions(root)
            last = versions[-1] if versions else None
            files = manifest(root, scan, last["files"] if last else None)
            if last is None or not _same(last["files"], files):
                last = {"version": len(versions) + 1, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "images": len(files), "files": files, "runs": [],
                        "changes": changes(versions[-1]["files"], files) if versions else {"added": len(files)}}
                versions.append(last)
            else:
                last["files"] = files          # same content; fresher mtimes spare the next hashing
            if run and run not in last["runs"]:
                last["runs"].append(run)
            self.store.mkdir(parents=True, exist_ok=True)
            write_text(self._file(root), json.dumps({"folder": str(root.resolve()), "versions": versions}))
            return last


def describe(version: dict) -> str:
    """One line for a version's changes, e.g. ``+8 images, 3 captions changed``."""
    c = version.get("changes") or {}
    bits = [f"+{c['added']} image(s)" if c.get("added") else "", f"{c['removed']} removed" if c.get("removed") else "",
            f"{c['replaced']} replaced" if c.get("replaced") else "",
            f"{c['recaptioned']} caption(s) changed" if c.get("recaptioned") else ""]
    return ", ".join(b for b in bits if b) or "no change"
