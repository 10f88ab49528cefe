"""Block-weighted merging (SuperMerger / merge-block-weighted style): one multiplier per UNet block.

Order of the 25 block weights: IN00–IN11, M00, OUT00–OUT11 (SD1/SD2 layout). SDXL has only IN00–IN08 and
OUT00–OUT08; the weights for the blocks it lacks are ignored. Keys outside the numbered blocks take other
multipliers: the text encoder ``te_multiplier``; time/label embedding, final ``out.*`` layers and the VAE the
plain merge multiplier (they belong to no block).
"""
from __future__ import annotations

import re

BLOCK_IDS = tuple([f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)])
N_BLOCKS = len(BLOCK_IDS)  # 25
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")

_RE_IN = re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\.")
_RE_OUT = re.compile(r"^model\.diffusion_model\.output_blocks\.(\d+)\.")


def _lin(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def _smooth(x: float) -> float:
    return x * x * (3 - 2 * x)


def _presets() -> dict[str, list[float]]:
    """The common SuperMerger-style curves, computed (not copied) so every value is exact and explainable."""
    half = _lin(1.0, 0.0, 13)  # IN00 .. M00
    p = {
        "ALL_A": [0.0] * N_BLOCKS, "ALL_B": [1.0] * N_BLOCKS,
        "FLAT_25": [0.25] * N_BLOCKS, "FLAT_50": [0.5] * N_BLOCKS, "FLAT_75": [0.75] * N_BLOCKS,
        # V: B dominates the outermost blocks, A the middle; A ("Λ") is the reverse
        "GRAD_V": half + half[::-1][1:],
        "GRAD_A": [1.0 - v for v in half + half[::-1][1:]],
        "SMOOTHSTEP": [_smooth(i / (N_BLOCKS - 1)) for i in range(N_BLOCKS)],
        "REVERSE_SMOOTHSTEP": [1.0 - _smooth(i / (N_BLOCKS - 1)) for i in range(N_BLOCKS)],
        "IN_ONLY": [1.0] * 12 + [0.0] * 13, "OUT_ONLY": [0.0] * 13 + [1.0] * 12, "MID_ONLY": [0.0] * 12 + [1.0] + [0.0] * 12,
    }
    # WRAPn: the n outermost blocks (n/2 input, n/2 output) from B, the rest from A
    for n in (8, 12, 14, 16):
        k = n // 2
        p[f"WRAP{n:02d}"] = [1.0] * k + [0.0] * (25 - 2 * k) + [1.0] * k
    return p


def presets() -> dict[str, list[float]]:
    """Preset name -> 25 block weights (a fresh copy each call)."""
    return _presets()


def parse_block_weights(value) -> list[float]:
    """A preset name, a comma-separated string or a sequence of 25 numbers -> list of 25 floats."""
    from ..errors import StudioError

    if isinstance(value, str):
        table = _presets()
        if value.strip().upper() in table:
            return table[value.strip().upper()]
        try:
            value = [float(v) for v in value.replace(";", ",").split(",") if v.strip()]
        except ValueError:
            raise StudioError(f"Block weights {value!r} are neither a preset nor numbers.", field="block_weights",
                              fix=f"use 25 comma-separated numbers or one of: {', '.join(table)}") from None
    weights = [float(v) for v in value]
    if len(weights) != N_BLOCKS:
        raise StudioError(f"Block weights need {N_BLOCKS} values (IN00–IN11, M00, OUT00–OUT11), got {len(weights)}.",
                          field="block_weights", fix="give 25 numbers or a preset name")
    return weights


def block_of(key: str) -> int | None:
    """Index into BLOCK_IDS for a UNet key inside a numbered block; None for every other key."""
    if m := _RE_IN.match(key):
        i = int(m.group(1))
        return i if i < 12 else None
    if key.startswith("model.diffusion_model.middle_block."):
        return 12
    if m := _RE_OUT.match(key):
        i = int(m.group(1))
        return 13 + i if i < 12 else None
    return None


def multiplier_for(key: str, multiplier: float, block_weights: list[float] | None,
                   te_multiplier: float | None) -> float:
    """The merge multiplier for one key under the rules in the module docstring."""
    if block_weights is None and te_multiplier is None:
        return multiplier
    if key.startswith(TEXT_PREFIXES):
        return multiplier if te_multiplier is None else te_multiplier
    if block_weights is not None and (b := block_of(key)) is not None:
        return block_weights[b]
    return multiplier
