"""ControlNet: models (models/ControlNet), preprocessors (models/annotators), units, and running them.

Submodules import torch/diffusers lazily where they can; ``apply`` needs diffusers.
"""
from __future__ import annotations

from .models import (ControlNetInfo, ControlNetLibrary, check_family, controlnet_family, load_controlnet,
                     peek_family)
from .builtin import default_preprocessors
from .preprocessors import ParamSpec, Preprocessor, Preprocessors, pixel_perfect_resolution
from .units import (CONTROL_MODES, RESIZE_MODES, ControlUnit, PreparedControl, infotext_params,
                    prepare_control_image, units_from_params)

__all__ = ["ControlNetInfo", "ControlNetLibrary", "check_family", "controlnet_family", "load_controlnet",
           "peek_family", "ParamSpec", "Preprocessor", "Preprocessors", "default_preprocessors",
           "pixel_perfect_resolution", "CONTROL_MODES", "RESIZE_MODES", "ControlUnit", "PreparedControl",
           "infotext_params", "prepare_control_image", "units_from_params"]
