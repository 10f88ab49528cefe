"""Progress events (JSON lines + an in-process callback), the stop request, and the run folder's layout."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

PROGRESS_FILE = "progress.jsonl"
STOP_FILE = "STOP"
STATE_DIR = "state"
SAMPLES_DIR = "samples"


class ProgressWriter:
    """Appends one JSON object per line (flushed at once, so a reader in another process sees whole lines)."""

    def __init__(self, path: str | os.PathLike | None, callback: Callable[[dict], None] | None = None,
                 enabled: bool = True):
        self.path = Path(path) if path else None
        self.callback = callback
        self.enabled = enabled
        if self.path and enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: dict) -> None:
        if not self.enabled:
            return
        event = {"time": round(time.time(), 3), **event}
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
        if self.callback:
            self.callback(event)


def read_events(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Complete lines from byte ``offset``; returns (events, new offset). A half-written last line waits."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events, offset + end


class StopRequest:
    """Stop when ``run_dir/STOP`` exists, ``request()`` was called, or SIGTERM / SIGINT arrived."""

    def __init__(self, run_dir: str | os.PathLike):
        self.file = Path(run_dir) / STOP_FILE
        self._flag = threading.Event()
        self._old: dict = {}

    def request(self) -> None:
        self._flag.set()

    def __call__(self) -> bool:
        return self._flag.is_set() or self.file.exists()

    def install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, lambda *_: self._flag.set())

    def restore_signals(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def clear(self) -> None:
        self._flag.clear()
        self.file.unlink(missing_ok=True)

    def clear_stale(self, since: float) -> None:
        """Remove a stop file left from before ``since`` (a run that stopped earlier). A newer one stays: Stop
        pressed while the trainer was still starting (importing torch, loading the model) must count."""
        try:
            if self.file.stat().st_mtime < since:
                self.file.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
