"""The CLIP tokenizer, loaded from the files shipped in ``clip_tokenizer/`` (no network).

SD1 and SDXL's first tokenizer pad with ``<|endoftext|>``; SD2 and SDXL's second tokenizer pad with ``!``
(id 0), as the OpenCLIP models were trained.
"""
from __future__ import annotations

import os

from ..errors import ModelLoadError

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_tokenizer")
OPENCLIP_PAD = "!"


def load_clip_tokenizer(pad_token: str = "<|endoftext|>", folder: str | None = None):
    """A transformers CLIPTokenizer (max length 77) from ``folder`` or the shipped files."""
    from transformers import CLIPTokenizer

    folder = folder or TOKENIZER_DIR
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        raise ModelLoadError(f"CLIP tokenizer files are missing in {folder}.", path=folder,
                             fix="run `python tools/derive_clip_tokenizer.py` to recreate them.")
    return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77, local_files_only=True)


def pad_token_for(family: str, second: bool = False) -> str:
    """Pad token for a family's first (or ``second``) tokenizer."""
    return OPENCLIP_PAD if family == "sd2" or second else "<|endoftext|>"
