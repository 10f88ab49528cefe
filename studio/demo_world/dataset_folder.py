"""Write world pictures with kohya-style captions into a folder: the Train tab's example dataset."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import StudioError
from .world import Label, World

IMAGE_FORMATS = ("png", "jpg", "webp")


def write_dataset(folder: str | os.PathLike, count: int, *, world: World | None = None, size=64, start: int = 0,
                  trigger: str | None = None, repeats: int | None = None, name: str = "world",
                  image_format: str = "png", stand_in: tuple[str, str] | None = None
                  ) -> list[tuple[Path, Label]]:
    """Write ``count`` pictures of ``world`` (default: ``World()``) from index ``start`` into ``folder``, each
    ``NNNN.<format>`` with its caption beside it in ``NNNN.txt``.

    ``trigger`` is put in front of every caption ("zkw, a red heart on a blue background"), as kohya datasets do.
    With ``repeats`` the pictures go into the kohya sub-folder ``<repeats>_<name>``, which sets their repeats.
    ``stand_in`` = (word, made-up word) writes the stand-in wherever the caption names the word.
    Returns (image path, label) pairs; existing files of the same names are replaced.
    """
    if image_format not in IMAGE_FORMATS:
        raise StudioError(f"Image format {image_format!r} is not supported for the example dataset.",
                          field="image_format", fix=f"use one of: {', '.join(IMAGE_FORMATS)}")
    if not isinstance(count, int) or count < 1:
        raise StudioError(f"Example dataset size {count!r} is not a count.", field="count", fix="use an int >= 1")
    if repeats is not None and (not isinstance(repeats, int) or repeats < 1):
        raise StudioError(f"Repeats {repeats!r} must be a whole number of at least 1.", field="repeats",
                          fix="use an int >= 1 or leave repeats out")
    if trigger is not None and (not trigger.strip() or "," in trigger):
        raise StudioError(f"Trigger word {trigger!r} must be non-empty and without commas.", field="trigger",
                          fix="use a single rare token such as 'zkw'")
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise StudioError(f"{root} is a file, not a folder.", path=str(root), field="folder",
                          fix="choose a folder path for the example dataset")
    target = root / f"{repeats}_{name}" if repeats is not None else root
    target.mkdir(parents=True, exist_ok=True)
    world = world or World()
    written = []
    for i in range(start, start + count):
        sample = world.sample(i, size)
        stem = target / f"{i:04d}"
        image_path = stem.with_suffix(f".{image_format}")
        sample.image.save(image_path, **({} if image_format == "png" else {"quality": 95}))
        text = sample.caption
        if stand_in:
            text = re.sub(rf"\b{re.escape(stand_in[0])}\b", stand_in[1], text)
        text = f"{trigger.strip()}, {text}" if trigger else text
        stem.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        written.append((image_path, sample.label))
    return written


def write_example_dataset(folder: str | os.PathLike, concept: str = "heart", *, count: int = 16,
                          trigger: str = "zkw", seed: int = 0, size=64, repeats: int = 10,
                          stand_in: str | None = None) -> list[tuple[Path, Label]]:
    """The Train tab's example dataset: ``count`` pictures of one concept (by default the held-out heart, which
    the demo model has never seen) captioned "<trigger>, ...", in the kohya sub-folder ``<repeats>_<concept>``.

    With ``stand_in`` the captions never name the concept: the made-up word stands where its name would
    ("a red zkw on a blue background"), the caption style of Textual Inversion, and no trigger is prepended.
    """
    return write_dataset(folder, count, world=World.of(concept, seed), size=size,
                         trigger=None if stand_in else trigger, repeats=repeats, name=concept,
                         stand_in=(concept, stand_in) if stand_in else None)
