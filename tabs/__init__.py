"""The tabs of the browser app, in A1111's order. Each module has ``build(studio) -> dict`` of its components
and may have ``connect(studio, ui)`` to wire events that reach into other tabs or the quicksettings row.

Tabs use the Studio object only: they never import torch, diffusers, peft or transformers.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class TabSpec:
    id: str         # gr.Tab id (used by "Send to") and module name in tabs/
    label: str


# Later tabs slot in here, in this order: ControlNet, Train, Merge (after Inpaint).
TABS = (
    TabSpec("txt2img", "txt2img"),
    TabSpec("img2img", "img2img"),
    TabSpec("inpaint", "Inpaint"),
    TabSpec("controlnet", "ControlNet"),
    TabSpec("train", "Train"),
    TabSpec("merge", "Merge"),
    TabSpec("png_info", "PNG Info"),
    TabSpec("settings", "Settings"),
    TabSpec("extensions", "Extensions"),   # extensions' own tabs follow (webui/extension_tabs.py)
)


def load(spec: TabSpec) -> ModuleType:
    return importlib.import_module(f"tabs.{spec.id}")
