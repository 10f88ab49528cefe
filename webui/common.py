"""Small helpers shared by the layout and the tabs (no torch; transformers only inside TokenCounter)."""
from __future__ import annotations

import html
import re
import threading
from typing import Any

NO_CHECKPOINT_HELP = """\
### No checkpoint yet
The studio needs a Stable Diffusion checkpoint (`.safetensors`) to make images. Any one of these works:

1. **Drop a file** into `{ckpt_dir}` and press the refresh button next to the checkpoint list at the top.
2. **Use an AUTOMATIC1111 install:** start with `python launch.py --ckpt-dir /path/to/stable-diffusion-webui/models/Stable-diffusion`.
3. **Type a Hugging Face repo id** (e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5`) into the checkpoint box
   when online and started with `--allow-download`.
4. **Try it offline:** press the button below (or start with `python launch.py --demo`) to install the demo
   model: a small toy, shipped with the studio, that draws one coloured shape on a plain background at 64 px.
"""


def checkpoint_titles(studio: Any) -> list[str]:
    return [info.title for info in studio.registry.checkpoints()]


def current_checkpoint_title(studio: Any) -> str | None:
    """The loaded checkpoint, else the configured default, else the first one on disk (A1111's order)."""
    current = getattr(studio.manager, "current", None)
    if current is not None:
        return current.title
    infos = studio.registry.checkpoints()
    wanted = studio.settings.default_checkpoint
    if wanted:
        for info in infos:
            if wanted in (info.name, info.title, info.model_name) or info.path.as_posix() == wanted:
                return info.title
        return wanted
    return infos[0].title if infos else None


def vae_choices(studio: Any) -> list[str]:
    return ["Automatic", "None", *[v.name for v in studio.registry.vaes()]]


def error_html(message: str) -> str:
    return f"<div class='studio-error' role='alert'>⚠ {html.escape(message)}</div>"


def note_html(message: str) -> str:
    return f"<div class='studio-note'>{html.escape(message)}</div>"


_EXTRA_NETWORK = re.compile(r"<[^<>:]+:[^<>]*>")
_WEIGHT = re.compile(r":\s*-?[\d.]+\s*(?=[)\]])")


class TokenCounter:
    """Counts CLIP tokens the way A1111's counter shows them ("12/75"; 75 more per extra chunk).

    Uses the engine's ``studio.count_tokens`` when it has one; otherwise the CLIP tokenizer shipped in
    ``studio/loading/clip_tokenizer`` (loaded once, on first use, so start-up stays fast).
    """

    def __init__(self, studio: Any):
        self._studio = studio
        self._tokenizer = None
        self._lock = threading.Lock()

    def _count(self, text: str) -> int:
        engine_count = getattr(self._studio, "count_tokens", None)
        if callable(engine_count):
            return int(engine_count(text))
        with self._lock:
            if self._tokenizer is None:
                from studio.loading.tokenizers import load_clip_tokenizer
                self._tokenizer = load_clip_tokenizer()
        # prompt syntax is not text: drop <lora:...>, weights and brackets, and BREAK, before counting
        clean = _WEIGHT.sub("", _EXTRA_NETWORK.sub("", text)).replace("BREAK", ",")
        clean = re.sub(r"(?<!\\)[()\[\]]", " ", clean)
        return len(self._tokenizer(clean, add_special_tokens=False, truncation=False)["input_ids"])

    def html(self, text: str) -> str:
        try:
            n = self._count(text) if text and text.strip() else 0  # no tokenizer load at page build
        except Exception as exc:  # noqa: BLE001 - a counter must never break typing
            return f"<span class='token-counter' title='{html.escape(str(exc))}'>?/75</span>"
        limit = max(75, -(-n // 75) * 75)
        over = " token-counter-over" if n > 75 else ""
        return f"<span class='token-counter{over}' title='CLIP tokens (75 per chunk)'>{n}/{limit}</span>"
