"""The demo world: seeded shapes with captions to train and test on, and a scorer that says what a picture shows.

Needs only numpy, PIL and (for the scorer) OpenCV; no torch.
"""
from __future__ import annotations

from .captions import caption, parse_prompt
from .palette import (ALL_SHAPES, ALL_TEXTURES, COLOUR_NAMES, HELD_OUT, POSITION_NAMES, SHAPES, SIZE_NAMES,
                      TEXTURES)
from .world import Label, Sample, World, WorldDataset, render

__all__ = ["ALL_SHAPES", "ALL_TEXTURES", "COLOUR_NAMES", "HELD_OUT", "POSITION_NAMES", "SHAPES", "SIZE_NAMES",
           "TEXTURES", "Label", "Sample", "World", "WorldDataset", "caption", "parse_prompt", "render"]
