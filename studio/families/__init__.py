"""The model families the studio knows: the built-in modules plus any installed plug-in.

A plug-in is a package that declares an entry point in the group ``studio.families`` pointing at a ``Family``
object (``[project.entry-points."studio.families"] myfam = "mypkg.family:FAMILY"``). ``detect`` asks every
family how surely a file is its own; the best score wins and a tie is an error naming both.
"""
from __future__ import annotations

import functools
import os

from ..errors import ModelLoadError
from .base import MODES, Family, Shapes, TextEncoder

__all__ = ["MODES", "Family", "TextEncoder", "all_families", "get", "detect_ldm", "detect_folder", "detect_controlnet", "from_version", "from_lora", "from_embedding",
           "label", "short_label"]


@functools.cache
def all_families() -> tuple[Family, ...]:
    """Built-in families, then plug-ins (read once per process: installing one needs a restart)."""
    from importlib.metadata import entry_points

    from . import flux, sd1, sd2, sd3, sdxl, zimage
    found = [sd1.FAMILY, sd2.FAMILY, sdxl.FAMILY, sdxl.REFINER, sd3.FAMILY, flux.FAMILY, zimage.FAMILY]
    names = {f.name for f in found}
    for ep in entry_points(group="studio.families"):
        try:
            fam = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not stop the studio
            import logging
            logging.getLogger(__name__).warning("Model family plug-in %s could not be loaded: %s", ep.value, e)
            continue
        if isinstance(fam, Family) and fam.name not in names:
            found.append(fam)
            names.add(fam.name)
    return tuple(found)


def get(name: str | Family | None) -> Family | None:
    """The family called ``name`` (a Family passes through; None or an unknown name gives None)."""
    if name is None or isinstance(name, Family):
        return name
    return next((f for f in all_families() if f.name == name), None)


def open_clip_prefixes() -> tuple[str, ...]:
    """Where the families' OpenCLIP text encoders sit in single files (their projections get renamed there)."""
    return tuple(sorted({te.ldm_prefix for f in all_families() for te in f.text_encoders if te.kind == "open_clip"}))


def label(name: str | Family | None) -> str:
    """"SD 1.x", "SDXL", ... for messages ("unknown" when nothing is known)."""
    fam = get(name)
    return fam.label if fam else (str(name) if name else "unknown")


def short_label(name: str | Family | None) -> str:
    fam = get(name)
    return fam.short if fam else (str(name).upper() if name else "?")


def from_version(text: str) -> Family | None:
    """The family a metadata value names (kohya ``ss_base_model_version``, ``modelspec.architecture``): the
    longest matching spelling wins, so "sdxl_refiner_v1-0" is the refiner, not SDXL."""
    text = (text or "").lower()
    best, length = None, 0
    for fam in all_families():
        for spelling in (fam.kohya_version, fam.modelspec_arch, *fam.aliases):
            if text.startswith(spelling.lower()) and len(spelling) > length:
                best, length = fam, len(spelling)
    return best


def _unique_best(scored: list[tuple[int, Family]]) -> Family | None:
    """The best-scoring family, or None when nothing scores or two tie (adapters may not tell)."""
    scored = sorted((s for s in scored if s[0] > 0), key=lambda s: -s[0])
    if not scored or (len(scored) > 1 and scored[0][0] == scored[1][0]):
        return None
    return scored[0][1]


def from_lora(encoders: set[str], cross_width: int | None = None, text_widths: dict[str, int] | None = None,
              unet_layers: frozenset[str] = frozenset()) -> Family | None:
    """The family a LoRA file's layers say (see ``Family.lora_score``), or None when they do not tell."""
    return _unique_best([(f.lora_score(set(encoders), cross_width, text_widths or {}, frozenset(unet_layers)), f)
                         for f in all_families()])


def lora_tops() -> tuple[str, ...]:
    """Every family's denoiser top-level module names, longest first (for matching underscored layer names)."""
    return tuple(sorted({t for f in all_families() for t in f.lora_tops}, key=len, reverse=True))


def from_embedding(parts: dict[str, int]) -> Family | None:
    """The family a textual-inversion file is for, from its parts and their widths (None: cannot tell)."""
    return _unique_best([(f.embedding_score(parts), f) for f in all_families()])


def _best(scored: list[tuple[int, Family]], path: str) -> Family | None:
    scored = sorted((s for s in scored if s[0] > 0), key=lambda s: -s[0])
    if not scored:
        return None
    if len(scored) > 1 and scored[0][0] == scored[1][0]:
        raise ModelLoadError(f"{os.path.basename(path) or 'This model'} fits two model families equally: "
                             f"{scored[0][1].label} and {scored[1][1].label}.", path=path,
                             fix="the file mixes parts of different models; re-download or re-merge it.")
    return scored[0][1]


def detect_ldm(shapes: Shapes, path: str = "") -> Family:
    """The family of a single-file checkpoint from its tensor names and shapes (a header is enough)."""
    fam = _best([(f.ldm_score(shapes), f) for f in all_families()], path)
    if fam is None:
        for f in all_families():
            why = f.why_not(shapes, path)
            if why is not None:
                raise why
        from ..loading.ldm_config import describe_non_checkpoint
        what, fix = describe_non_checkpoint(shapes)
        raise ModelLoadError(f"{os.path.basename(path) or 'This file'} looks like {what}, not a checkpoint.",
                             path=path, fix=fix + ".")
    fam.check_ldm(shapes, path)
    return fam


def detect_controlnet(config, path: str = "") -> Family:
    """The family a ControlNet is made for, from its diffusers config (a dict or a config object)."""
    cfg = config if isinstance(config, dict) else {k: getattr(config, k, None) for k in
                                                    ("cross_attention_dim", "addition_embed_type",
                                                     "use_linear_projection")}
    fam = _best([(f.controlnet_score(cfg), f) for f in all_families()], path)
    if fam is None:
        raise ModelLoadError(f"{os.path.basename(path) or 'This ControlNet'}: no model family the studio knows "
                             f"takes a ControlNet of cross-attention width {cfg.get('cross_attention_dim')}.",
                             path=path, fix="use a ControlNet made for a supported model family.")
    return fam


def detect_folder(index: dict, configs: dict[str, dict], path: str = "") -> Family:
    """The family of a diffusers folder from ``model_index.json`` and its subfolders' config files."""
    fam = _best([(f.folder_score(index, configs), f) for f in all_families()], path)
    if fam is None:
        for f in all_families():
            why = f.folder_why_not(configs, path)
            if why is not None:
                raise why
        raise ModelLoadError(f"{path}: no model family the studio knows has this layout "
                             f"({', '.join(sorted(configs))}).", path=path,
                             fix="use a diffusers folder of a supported model family.")
    fam.check_folder(configs, path)
    return fam
