"""Caption tools (bulk edits, tag frequency, per-step shuffle / dropout) and BLIP auto-captioning."""
from __future__ import annotations

import os
import random
import re
from collections import Counter
from pathlib import Path

from ..errors import StudioError
from .atomic import write_text
from .dataset import ImageItem

CAPTIONER_DIR = "captioners"
BLIP_DEFAULT = "blip-image-captioning-base"


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def edit_caption(caption: str, *, trigger: str = "", prefix: str = "", suffix: str = "",
                 find: str = "", replace: str = "") -> str:
    """One caption after the bulk edits (a trigger word is added once, as the first tag)."""
    if find:
        caption = caption.replace(find, replace)
    tags = split_tags(caption)
    if prefix:
        tags = split_tags(prefix) + tags
    if suffix:
        tags = tags + split_tags(suffix)
    if trigger and trigger not in tags:
        tags = [trigger] + tags
    return join_tags(tags)


def bulk_edit(items: list[ImageItem], *, write: bool = True, extension: str = ".txt", **edits) -> list[ImageItem]:
    """Apply ``edit_caption`` to every item; with ``write`` the caption files are rewritten atomically."""
    for item in items:
        item.caption = edit_caption(item.caption, **edits)
        if write:
            set_caption(item, item.caption, extension)
    return items


def set_caption(item: ImageItem, caption: str, extension: str = ".txt") -> Path:
    item.caption = caption.strip()
    path = item.caption_path or item.path.with_suffix(extension)
    write_text(path, item.caption + "\n")
    item.caption_path = path
    return path


def caption_from_prompt(prompt: str) -> str:
    """A generation prompt as a training caption: extra-network tags (``<lora:name:1>``, ``<lyco:...>``) go (a
    refined LoRA must not be asked to load itself), the rest stays as written, tidied into ``a, b, c`` tags."""
    text = re.sub(r"<[^<>:]+:[^<>]*>", " ", prompt or "")
    return join_tags(" ".join(t.split()) for t in split_tags(text))


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """``{subset: {tag: count}}`` — the shape of kohya's ``ss_tag_frequency``."""
    out: dict[str, Counter] = {}
    for item in items:
        out.setdefault(item.subset, Counter()).update(split_tags(item.caption))
    return {k: dict(v.most_common()) for k, v in out.items()}


def training_caption(caption: str, rng: random.Random, *, shuffle: bool, keep_tokens: int,
                     dropout: float) -> str:
    """The caption one step sees: maybe dropped, maybe shuffled with the first ``keep_tokens`` tags fixed."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return join_tags(head + tail)


# ---- BLIP ------------------------------------------------------------------------------------------------------
def captioner_folder(models_dir: str | os.PathLike, name: str = BLIP_DEFAULT) -> Path:
    return Path(models_dir) / CAPTIONER_DIR / name


class BlipCaptioner:
    """BLIP captioning from a local transformers folder (e.g. Salesforce/blip-image-captioning-base layout).

    The common recipe: caption = trigger + BLIP text (+ style suffix)."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", max_new_tokens: int = 30):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise StudioError(f"No BLIP captioner in {folder} (config.json, weights and processor files "
                              "expected).", path=str(folder),
                              fix=f"put Salesforce/{BLIP_DEFAULT} (or another BLIP model) into that folder")
        from transformers import BlipForConditionalGeneration, BlipProcessor
        self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
        self.model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def caption(self, image, *, prompt: str = "") -> str:
        import torch
        inputs = self.processor(images=image.convert("RGB"), text=prompt or None, return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False)
        return self.processor.decode(ids[0], skip_special_tokens=True).strip()

    def caption_items(self, items: list[ImageItem], *, trigger: str = "", suffix: str = "", overwrite: bool = False,
                      write: bool = True, extension: str = ".txt") -> list[ImageItem]:
        from PIL import Image
        for item in items:
            if item.caption and not overwrite:
                continue
            with Image.open(item.path) as im:
                text = self.caption(im)
            caption = edit_caption(text, trigger=trigger, suffix=suffix)
            if write:
                set_caption(item, caption, extension)
            else:
                item.caption = caption
        return items
