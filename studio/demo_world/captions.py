"""Plain-English captions for world labels, and the reverse: what a prompt asks for."""
from __future__ import annotations

import re

import numpy as np

from .palette import ALL_SHAPES, ALL_TEXTURES, COLOUR_NAMES, POSITION_NAMES, SIZE_NAMES

# Where the object is, as a phrase that reads naturally after the noun.
_WHERE: tuple[tuple[str, str], ...] = (("centre", "in the centre"), ("top", "at the top"),
                                       ("bottom", "at the bottom"), ("left", "on the left"), ("right", "on the right"))

# {obj} is "[size ][texture ]colour shape"; {where} a position phrase; {bg} the background colour.
# Templates that name the size or the position only sometimes teach a model sensible defaults for both.
TEMPLATES: tuple[str, ...] = (
    "a {obj} on a {bg} background",
    "a {obj} {where}, {bg} background",
    "{obj}, {bg} background",
    "a {obj} {where} with a {bg} background",
    "a picture of a {obj} against a {bg} background",
    "a {obj} on {bg}",
)


def where(position: str) -> str:
    return dict(_WHERE).get(position, f"in the {position}")


def caption(label, variant: int, *, with_size: bool = True) -> str:
    """The caption of ``label`` in template ``variant`` (any int; taken modulo the number of templates)."""
    words = [label.size] if with_size else []
    if label.texture != "plain":
        words.append(label.texture)
    words += [label.colour, label.shape]
    text = TEMPLATES[variant % len(TEMPLATES)].format(obj=" ".join(words), where=where(label.position),
                                                      bg=label.background)
    return re.sub(r"\ba ([aeiou])", r"an \1", text)  # "on an orange background" too


def random_caption(label, rng: np.random.Generator) -> str:
    """A caption with template variety; the size is named in half of them (it is the vaguest attribute)."""
    return caption(label, int(rng.integers(len(TEMPLATES))), with_size=bool(rng.random() < 0.5))


def parse_prompt(prompt: str) -> dict[str, str]:
    """What a world-style prompt asks for: any of shape, colour, background, size, position, texture.

    The object's colour is the colour word nearest before the shape word; the background colour is the one
    followed by "background" (or, failing that, after "on" / "against"). Words it does not know are ignored.
    """
    text = " ".join(re.findall(r"[a-z]+", prompt.lower()))
    out: dict[str, str] = {}
    shape_at = -1
    for shape in ALL_SHAPES:
        m = re.search(rf"\b{shape}s?\b", text)
        if m:
            out["shape"], shape_at = shape, m.start()
            break
    colours = [(m.start(), c) for c in COLOUR_NAMES for m in re.finditer(rf"\b{c}\b", text)]
    bg = re.search(rf"\b({'|'.join(COLOUR_NAMES)}) background\b", text) or \
        re.search(rf"\b(?:on|against) (?:a |an )?({'|'.join(COLOUR_NAMES)})\b", text)
    if bg:
        out["background"] = bg.group(1)
    before = [c for at, c in sorted(colours) if shape_at >= 0 and at < shape_at and not (bg and at == bg.start(1))]
    if before:
        out["colour"] = before[-1]
    for size in SIZE_NAMES:
        if re.search(rf"\b{size}\b", text):
            out["size"] = size
    for position in sorted(POSITION_NAMES, key=len, reverse=True):
        if re.search(rf"\b{position}\b", text) or (position == "centre" and re.search(r"\bcenter\b", text)):
            out["position"] = position
            break
    for texture in ALL_TEXTURES:
        if re.search(rf"\b{texture}\b", text):
            out["texture"] = texture
    return out
