"""Image -> caption for ``/sdapi/v1/interrogate``: a BLIP captioner (transformers folder) from ``models/captioners``.

A1111's "clip" interrogator is a BLIP caption followed by CLIP-ranked artist / medium / flavour phrases; the
studio gives the BLIP caption (the sentence that describes the image). "deepdanbooru" (anime tags) has no
model here and is refused with a clear message. A folder name from ``models/captioners`` may also be passed
as the model. The BLIP model is cached with the checkpoints (same LRU and memory budgets); jobs run through
the queue so captioning never overlaps a generation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StudioError
from .training.captions import BLIP_DEFAULT, CAPTIONER_DIR   # the Train tab's auto-captioner uses the same folder

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

A1111_MODELS = ("clip", "deepdanbooru")
MAX_NEW_TOKENS = 40
_FILES = "config.json, model.safetensors, preprocessor_config.json and the tokenizer files"


def captioners_root(models_dir: str) -> Path:
    return Path(models_dir) / CAPTIONER_DIR


def blip_folders(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that hold a transformers BLIP model (config.json with a blip model_type)."""
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and str(cfg.get("model_type", "")).startswith("blip"):
            found.append(folder)
    return found


def resolve_captioner(models_dir: str, model: str) -> Path:
    """The BLIP folder for an interrogate ``model`` name; StudioError (field ``model``) otherwise."""
    root = captioners_root(models_dir)
    name = (model or "clip").strip()
    folders = blip_folders(root)
    by_name = {f.name: f for f in folders}
    if name in by_name:
        return by_name[name]
    if name == "deepdanbooru":
        raise StudioError("The DeepDanbooru tagger is not available in the studio.", field="model", status=404,
                          fix="use model 'clip' (a BLIP caption of the image)")
    if name != "clip":
        choices = ", ".join(dict.fromkeys([*A1111_MODELS, *by_name]))
        raise StudioError(f"Unknown interrogate model {model!r}.", field="model", fix=f"use one of: {choices}")
    if not folders:
        raise StudioError(f"No captioning model in {root}.", field="model", status=404, path=str(root),
                          fix=f"put Salesforce/{BLIP_DEFAULT} (its {_FILES}) into {root / BLIP_DEFAULT}")
    return by_name.get(BLIP_DEFAULT, folders[0])


def _load_blip(folder: Path) -> Any:
    from transformers import BlipForConditionalGeneration
    try:
        return BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise StudioError(f"The captioner in {folder} could not be loaded ({exc}).", field="model", status=422,
                          path=str(folder), fix=f"the folder needs {_FILES}; download it again") from None


def caption(manager: Any, folder: Path, image: "Image", max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The BLIP caption of ``image`` (greedy, deterministic)."""
    import torch
    from transformers import BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise StudioError(f"The captioner in {folder} has no usable processor / tokenizer files ({exc}).",
                          field="model", path=str(folder), fix=f"the folder needs {_FILES}") from None
    stamp = (folder / "config.json").stat().st_mtime_ns
    key = ("captioner", str(folder), stamp)
    with manager.acquire_module(key, f"Captioner {folder.name}", lambda: _load_blip(folder)) as model:
        param = next(model.parameters())
        inputs = processor(images=image.convert("RGB"), return_tensors="pt")
        inputs = {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype)
                  for k, v in inputs.items()}
        # generation starts from one [BOS] token; a small model's position table bounds the length
        room = int(getattr(model.config.text_config, "max_position_embeddings", 512)) - 2
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max(1, min(max_new_tokens, room)), num_beams=1,
                                 do_sample=False)
    return processor.decode(ids[0], skip_special_tokens=True).strip()


def submit_interrogate(studio: Any, image: "Image", model: str) -> Any:
    """Queue a caption job (after any running generation); the job's result is the caption text."""
    folder = resolve_captioner(studio.settings.models_dir, model)
    return studio.queue.submit(lambda ctx: caption(studio.manager, folder, image), kind="interrogate",
                               description=f"interrogate ({folder.name})")
