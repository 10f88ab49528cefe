"""The demo world: seeded shapes with captions to train and test on, and a scorer that says what a picture shows.

Needs only numpy and PIL; the scorer also OpenCV, imported on first use of a scorer name (``studio.demo_world.score``)
so drawing pictures does not load it. No torch.
"""
from __future__ import annotations

from .captions import caption, parse_prompt
from .dataset_folder import write_dataset, write_example_dataset
from .palette import (ALL_SHAPES, ALL_TEXTURES, COLOUR_NAMES, HELD_OUT, POSITION_NAMES, SHAPES, SIZE_NAMES,
                      TEXTURES)
from .world import Label, Sample, World, WorldDataset, render

__all__ = ["ALL_SHAPES", "ALL_TEXTURES", "COLOUR_NAMES", "HELD_OUT", "POSITION_NAMES", "SHAPES", "SIZE_NAMES",
           "TEXTURES", "Label", "Sample", "Score", "World", "WorldDataset", "box_iou", "caption", "mask_iou",
           "parse_prompt", "render", "score", "write_dataset", "write_example_dataset"]

_SCORER_NAMES = ("Score", "box_iou", "mask_iou", "score")


def __getattr__(name: str):
    if name in _SCORER_NAMES:
        from . import scorer
        return getattr(scorer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
