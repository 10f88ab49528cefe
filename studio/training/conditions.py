"""ControlNet training conditions: one condition image per training image.

Two sources, one result (a condition file per image, which the trainer loads with the image's own crop and flip):
- ``conditioning = "folder"``: pairs the user made, ``name.png`` + ``conditioning/name.png`` beside it (the layout
  of diffusers' ControlNet example, per kohya sub-folder). A missing or extra pair, or a size that differs from its
  image, is an error naming the files, before anything starts.
- a preprocessor name (``canny``, ``lineart_standard``, an extension's ``blueprint_lines``, ...): the maps are made
  once from the full-size images into ``<run>/conditions/`` and reused while the image and the settings are the
  same (``conditions/manifest.json`` says what made each file).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import StudioError
from .dataset import CONDITIONING_DIR, IMAGE_EXTS, DatasetScan

FOLDER = "folder"
CONDITIONS_DIR = "conditions"
MANIFEST = "manifest.json"
_SHOW = 5          # file names listed in a message


def paired_path(image: Path) -> Path | None:
    """The user's condition file for ``image``: ``conditioning/<stem>.<any image extension>`` beside it."""
    folder = image.parent / CONDITIONING_DIR
    for ext in IMAGE_EXTS:
        for cand in (folder / f"{image.stem}{ext}", folder / f"{image.stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _names(paths, root: Path) -> str:
    shown = [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p in paths[:_SHOW]]
    more = f" and {len(paths) - _SHOW} more" if len(paths) > _SHOW else ""
    return ", ".join(shown) + more


def check_pairs(scan: DatasetScan, root: str | os.PathLike) -> dict[Path, Path]:
    """Image -> condition file for a folder of pairs; StudioError naming every kind of mismatch."""
    from PIL import Image

    root = Path(root)
    pairs, missing, wrong_size = {}, [], []
    for item in scan.items:
        cond = paired_path(item.path)
        if cond is None:
            missing.append(item.path)
            continue
        with Image.open(cond) as im:
            if im.size != (item.width, item.height):
                wrong_size.append(f"{cond.relative_to(root)} is {im.width}x{im.height}, its image "
                                  f"{item.width}x{item.height}")
        pairs[item.path] = cond
    stems = {(i.path.parent, i.path.stem) for i in scan.items}
    extra = sorted(p for d in {i.path.parent for i in scan.items} | {root} if (d / CONDITIONING_DIR).is_dir()
                   for p in (d / CONDITIONING_DIR).iterdir()
                   if p.suffix.lower() in IMAGE_EXTS and (d, p.stem) not in stems)
    problems = []
    if missing:
        problems.append(f"no condition image for {_names(missing, root)}")
    if extra:
        problems.append(f"condition images without a training image: {_names(extra, root)}")
    if wrong_size:
        problems.append("sizes differ: " + "; ".join(wrong_size[:_SHOW]))
    if problems:
        raise StudioError(f"The ControlNet dataset {root.name} does not pair up: " + "; ".join(problems) + ".",
                          field="controlnet.conditioning", path=str(root),
                          fix=f"put one condition image of the same size per training image in a "
                              f"'{CONDITIONING_DIR}/' folder beside it (same file name), or pick a preprocessor "
                              "to make them")
    if not pairs:
        raise StudioError(f"No training images in {root}.", field="dataset.dataset_dir", path=str(root),
                          fix="add images and their conditioning/ pairs")
    return pairs


def _stamp(image: Path, preprocessor: str, params: dict) -> str:
    st = image.stat()
    raw = json.dumps([str(image.resolve()), st.st_mtime_ns, st.st_size, preprocessor, sorted(params.items())])
    return hashlib.sha1(raw.encode()).hexdigest()


def made_path(run_dir: str | os.PathLike, image: Path, root: Path) -> Path:
    rel = image.resolve().relative_to(root.resolve())
    return Path(run_dir) / CONDITIONS_DIR / rel.with_suffix(".png")


def _manifest(run_dir) -> dict:
    try:
        return json.loads((Path(run_dir) / CONDITIONS_DIR / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def stale(scan: DatasetScan, root, run_dir, preprocessor: str, params: dict | None = None) -> list:
    """The items whose condition map is missing or was made from another image or setting."""
    manifest, folder = _manifest(run_dir), Path(run_dir) / CONDITIONS_DIR
    out = []
    for item in scan.items:
        target = made_path(run_dir, item.path, Path(root))
        if manifest.get(str(target.relative_to(folder))) != _stamp(item.path, preprocessor, dict(params or {})) \
                or not target.is_file():
            out.append(item)
    return out


def make_conditions(scan: DatasetScan, root: str | os.PathLike, run_dir: str | os.PathLike, preprocessor: str,
                    preprocessors, params: dict | None = None, progress=None, stop=None) -> dict[Path, Path]:
    """Run ``preprocessor`` over every image once (at the image's own short side) into ``<run>/conditions``;
    files whose image and settings did not change are kept. Returns image -> condition file."""
    from PIL import Image

    from .atomic import save_image, write_text

    root, params = Path(root), dict(params or {})
    preprocessors.get(preprocessor, field="controlnet.conditioning")      # a clear error for an unknown name
    folder = Path(run_dir) / CONDITIONS_DIR
    manifest = _manifest(run_dir)
    out, changed = {}, False
    for i, item in enumerate(scan.items):
        if stop is not None and stop():
            break
        target = made_path(run_dir, item.path, root)
        key = str(target.relative_to(folder))
        stamp = _stamp(item.path, preprocessor, params)
        if manifest.get(key) != stamp or not target.is_file():
            with Image.open(item.path) as im:
                image = im.convert("RGB")
            cond = preprocessors.run(preprocessor, image, min(image.size), params)
            if cond.size != image.size:
                cond = cond.resize(image.size, Image.Resampling.BILINEAR)
            save_image(target, cond.convert("RGB"))
            manifest[key] = stamp
            changed = True
            if progress is not None:
                progress({"type": "condition", "index": i + 1, "total": len(scan.items), "path": str(target)})
        out[item.path] = target
    if changed:
        write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return out


def condition_files(cfg, scan: DatasetScan) -> dict[Path, Path]:
    """What the trainer reads: the user's pairs, or the maps ``prepare_conditions`` made for this run."""
    root = Path(cfg.dataset_dir)
    if cfg.conditioning == FOLDER:
        return check_pairs(scan, root)
    files = {it.path: made_path(cfg.run_dir, it.path, root) for it in scan.items}
    missing = [img for img, cond in files.items() if not cond.is_file()]
    if missing:
        raise StudioError(f"The {cfg.conditioning} conditions of {_names(missing, root)} were not made.",
                          field="controlnet.conditioning", path=str(root),
                          fix="start the run from the studio or `launch.py --train`, which make them first")
    return files


def load_condition(path: Path, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """A condition image with its training image's resize, crop and flip: [3, h, w] in [0, 1] (ControlNet's
    ``controlnet_cond`` range)."""
    from .buckets import load_pixels
    return load_pixels(path, size, flip).add(1.0).div(2.0)


def _base_family(base_model: str) -> str | None:
    """The base checkpoint's family from its header (None where that needs a full read)."""
    if not base_model.lower().endswith(".safetensors") or not Path(base_model).is_file():
        return None
    from .. import families
    from ..loading.state_dict import read_header_shapes
    return families.detect_ldm(read_header_shapes(base_model), base_model).name


def preflight(cfg, preprocessors=None) -> None:
    """Before a ControlNet run is queued: the pairs add up, the preprocessor exists, a ControlNet to go on from
    is of the base model's family. Each failure is a StudioError naming the files."""
    if not cfg.is_controlnet:
        return
    from .dataset import scan_dataset
    scan = scan_dataset(cfg.dataset_dir, min_side=cfg.min_image_side, repeats=cfg.repeats,
                        caption_extension=cfg.caption_extension)
    if cfg.conditioning == FOLDER:
        check_pairs(scan, cfg.dataset_dir)
    elif preprocessors is not None:
        preprocessors.get(cfg.conditioning, field="controlnet.conditioning")
    if cfg.controlnet_init:
        from ..controlnet.models import check_family, peek_family
        check_family(peek_family(cfg.controlnet_init), _base_family(cfg.base_model),
                     (Path(cfg.controlnet_init).name, Path(cfg.base_model).name), field="controlnet.controlnet_init")


def prepare_conditions(cfg, preprocessors=None, progress=None, stop=None) -> None:
    """Make a preprocessor run's condition maps (the studio passes its registry, extensions' preprocessors
    included; the CLI builds one, and a Studio when the name is an extension's)."""
    cfg = cfg.resolved()
    if not cfg.is_controlnet or cfg.conditioning == FOLDER:
        return
    from .dataset import scan_dataset
    scan = scan_dataset(cfg.dataset_dir, min_side=cfg.min_image_side, repeats=cfg.repeats,
                        caption_extension=cfg.caption_extension)
    if not stale(scan, cfg.dataset_dir, cfg.run_dir, cfg.conditioning):
        return                                 # made before the child process started (or by an earlier run)
    studio = None
    if preprocessors is None:
        from ..controlnet import default_preprocessors
        from ..settings import Settings
        settings = Settings(models_dir=cfg.models_dir, data_dir=str(Path(cfg.run_dir) / "studio-data"),
                            outdir=str(Path(cfg.run_dir) / "outputs"), save_images=False)
        preprocessors = default_preprocessors(settings.annotators_path)
        if cfg.conditioning not in preprocessors.names():
            from ..app import Studio
            studio = Studio(settings)          # an extension's preprocessor
            preprocessors = studio.preprocessors
    try:
        make_conditions(scan, cfg.dataset_dir, cfg.run_dir, cfg.conditioning, preprocessors, progress=progress,
                        stop=stop)
    finally:
        if studio is not None:
            studio.close()
