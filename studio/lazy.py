"""Modules imported on first use, so the server answers before torch (~2 s of imports) is loaded.

``from .lazy import torch`` gives an object whose attributes are the real ``torch``'s; the first attribute access
imports it (thread-safe: Python's import lock makes a caller wait for a warm-up import running elsewhere).
Annotations stay strings (``from __future__ import annotations``), so ``torch.Tensor`` in them costs nothing.
"""
from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for the module ``name``; importing happens at the first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch = LazyModule("torch")
