"""NVIDIA GPUs as ``nvidia-smi`` reports them: known without torch (a CPU build of torch cannot see them).

Standard library only, and no relative imports: ``launch.py`` loads this file by path before the virtual
environment exists, to pick the torch wheel.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable

QUERY = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class NvidiaGpu:
    name: str
    memory_mb: int
    driver: str

    @property
    def driver_major(self) -> int:
        head = self.driver.split(".")[0]
        return int(head) if head.isdigit() else 0


def parse_query(text: str) -> list[NvidiaGpu]:
    """Lines of ``name, memory MiB, driver`` (the QUERY output) -> GPUs; lines that do not parse are skipped."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3 or not parts[0]:
            continue
        memory = int(parts[1]) if parts[1].isdigit() else 0
        gpus.append(NvidiaGpu(parts[0], memory, parts[2]))
    return gpus


def nvidia_gpus(run: Callable = subprocess.run, which: Callable = shutil.which) -> list[NvidiaGpu]:
    """The GPUs ``nvidia-smi`` lists; [] when it is not installed, fails or hangs (no driver, no GPU)."""
    if which("nvidia-smi") is None:
        return []
    try:
        out = run(QUERY, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if getattr(out, "returncode", 1) != 0:
        return []
    return parse_query(out.stdout or "")
