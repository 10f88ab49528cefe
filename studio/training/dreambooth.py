"""DreamBooth prior preservation: class images, made by the studio's own engine when fewer than asked exist."""
from __future__ import annotations

from pathlib import Path

from ..errors import StudioError
from .atomic import save_image, write_text
from .config import TrainConfig
from .dataset import ImageItem, scan_dataset


def class_items(cfg: TrainConfig) -> list[ImageItem]:
    folder = Path(cfg.class_images_dir)
    items = scan_dataset(folder, min_side=8, caption_extension=cfg.caption_extension).items if folder.is_dir() else []
    if not items:
        raise StudioError(f"No class images in {folder}.", field="dreambooth.class_images_dir",
                          fix="set num_class_images so the studio generates them, or add images")
    return items


def missing_class_images(cfg: TrainConfig) -> int:
    folder = Path(cfg.class_images_dir)
    have = len(scan_dataset(folder, min_side=8).items) if folder.is_dir() else 0
    return max(0, cfg.num_class_images - have)


def ensure_class_images(cfg: TrainConfig, studio, *, steps: int = 20, sampler: str = "Euler a",
                        progress=None) -> list[Path]:
    """Generate the missing class images with ``studio.generate`` (the normal engine and queue) from the class
    prompt; each PNG gets a caption file with the class prompt. Returns the new files."""
    from ..request import GenerationRequest

    cfg = cfg.resolved()
    missing = missing_class_images(cfg)
    folder = Path(cfg.class_images_dir)
    folder.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    start = len(list(folder.glob("class_*.png")))
    for i in range(missing):
        req = GenerationRequest(prompt=cfg.class_prompt, steps=steps, sampler_name=sampler,
                                width=cfg.resolution, height=cfg.resolution, seed=cfg.seed + start + i,
                                checkpoint=Path(cfg.base_model).name, save_images=False, cfg_scale=7.0)
        image = studio.generate(req).images[0]
        path = save_image(folder / f"class_{start + i:05d}.png", image)
        write_text(path.with_suffix(cfg.caption_extension), cfg.class_prompt + "\n")
        made.append(path)
        if progress:
            progress({"type": "class_image", "index": i + 1, "total": missing, "path": str(path)})
    return made
