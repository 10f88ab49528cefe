"""The CLIP tokenizer, loaded from the files shipped in ``clip_tokenizer/`` (no network).

CLIP-L encoders pad with ``<|endoftext|>``, OpenCLIP ones with ``!`` (id 0), as they were trained; each
family's ``TextEncoder.pad_token`` says which.
"""
from __future__ import annotations

import os

from ..errors import ModelLoadError

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_tokenizer")


def load_clip_tokenizer(pad_token: str = "<|endoftext|>", folder: str | None = None):
    """A transformers CLIPTokenizer (max length 77) from ``folder`` or the shipped files."""
    from transformers import CLIPTokenizer

    folder = folder or TOKENIZER_DIR
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        raise ModelLoadError(f"CLIP tokenizer files are missing in {folder}.", path=folder,
                             fix="run `python tools/derive_clip_tokenizer.py` to recreate them.")
    return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77, local_files_only=True)
