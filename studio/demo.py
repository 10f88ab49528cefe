"""The trained demo model (studio/demo_assets): installing it, and what it knows, said from the demo world itself.

``python launch.py --demo`` and the "Install the demo model" button both call :func:`install_demo_model`; the UI
shows :func:`demo_description` while the demo is the selected checkpoint, built from ``studio.demo_world``'s own
vocabulary so it stays true when the world changes. (The untrained random models are test fixtures only:
``tests/tinymodels.py``.)
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .settings import Settings

TRAINED_NAME = "demo-shapes.safetensors"
TRAINED_FILE = Path(__file__).resolve().parent / "demo_assets" / TRAINED_NAME
CONTROLNET_NAME = "demo-canny.safetensors"      # trained by tools.train_demo_controlnet (studio's own training)
CONTROLNET_FILE = TRAINED_FILE.with_name(CONTROLNET_NAME)
NATIVE_SIZE = 64          # px; modelspec.resolution in the file says the same (the UI reads it from there)
WORKS_UP_TO = 128         # px: beyond this it tiles many shapes
EXAMPLE_PROMPTS = ("a red circle on a blue background", "a small yellow star in the top left, white background",
                   "a large purple ring on an orange background")
EXAMPLE_TRIGGER = "zkw"
EXAMPLE_CONCEPT = "heart"
# Train tab settings that teach the example concept in about a minute on a CPU (the LoRA draws the heart for 95 %
# and 100 % of 20 seeds at training seeds 0 and 1; tests/training/test_concept_learning.py trains with these). The
# form's general defaults (lr 1e-4, batch 1, one epoch) are kohya's starting point for real models and learn
# nothing visible here in 160 steps. Min-SNR 5 as the demo model itself was trained: without it the result swung
# with the seed (55 % to 90 %).
EXAMPLE_RECIPE = {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 400, "min_snr_gamma": 5.0}


def demo_size_mb() -> float:
    return TRAINED_FILE.stat().st_size / 1e6


def install_demo_model(settings: Settings) -> Path:
    """Copy the trained demo model into the checkpoint folder and its canny ControlNet into the ControlNet folder
    (once each) and return the checkpoint's path.

    Copies, not links: the user's models folder must not depend on where the studio's code lives. Each copy goes
    to a hidden ``.part`` file first, then is renamed, so a half-copied file never shows in a model list.
    """
    _install(CONTROLNET_FILE, settings.controlnet_path / CONTROLNET_NAME)
    return _install(TRAINED_FILE, settings.ckpt_path / TRAINED_NAME)


def _install(src: Path, path: Path) -> Path:
    if not path.exists() or path.is_symlink() or path.stat().st_size != src.stat().st_size:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        shutil.copyfile(src, tmp)
        if path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
    return path


def is_demo_checkpoint(name: str | None) -> bool:
    """True for the trained demo model, by name or title ("demo-shapes.safetensors [abcdef1234]")."""
    if not name:
        return False
    base = Path(name.split(" [")[0]).name
    return base in (TRAINED_NAME, Path(TRAINED_NAME).stem)


_TEXTURE_NOUNS = {"striped": "stripes"}    # "it has never seen stripes" reads better than "striped things"


def _words(items, last: str = "and") -> str:
    items = list(items)
    return ", ".join(items[:-1]) + f" {last} {items[-1]}" if len(items) > 1 else "".join(items)


def demo_summary() -> str:
    """One line for the CLI and messages: what the demo model is."""
    return (f"a {demo_size_mb():.1f} MB toy that draws one coloured shape on a plain background, "
            f"{NATIVE_SIZE} px native")


def demo_description() -> str:
    """What the demo model knows (Markdown), from the demo world's own vocabulary."""
    from .demo_world.palette import (COLOUR_NAMES, HELD_OUT_SHAPES, HELD_OUT_TEXTURES, POSITION_NAMES, SHAPES,
                                     SIZE_NAMES)
    held = _words([f"{s}s" for s in HELD_OUT_SHAPES]
                  + [_TEXTURE_NOUNS.get(t, f"{t} shapes") for t in HELD_OUT_TEXTURES], last="or")
    examples = " · ".join(f"`{p}`" for p in EXAMPLE_PROMPTS)
    return (f"**Demo model: a toy.** It draws one flat-colour shape on a flat background, and knows nothing else.\n\n"
            f"- **Shapes:** {_words(SHAPES)}\n"
            f"- **Colours** (shape and background): {_words(COLOUR_NAMES)}\n"
            f"- **Sizes:** {_words(SIZE_NAMES)} · **positions:** {_words(POSITION_NAMES)}\n"
            f"- **Size:** {NATIVE_SIZE}×{NATIVE_SIZE} px native, works up to about {WORKS_UP_TO} px "
            f"(larger pictures tile many shapes); Hires. fix 2× works.\n"
            f"- **Try:** {examples}\n\n"
            f"- **ControlNet:** `{Path(CONTROLNET_NAME).stem}` (installed with it) puts the shape where a canny "
            f"edge map says: a unit with the `canny` preprocessor on any picture of a shape.\n\n"
            f"It has never seen {held}: teach it one in the **Train** tab with the **Example dataset** button.")
