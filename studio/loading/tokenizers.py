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


T5_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t5_tokenizer")
T5_FILES = ("tokenizer.json", "spiece.model")


def load_t5_tokenizer(folder: str | None = None, max_length: int = 512):
    """A transformers T5TokenizerFast from ``folder`` (a diffusers ``tokenizer_2`` / ``tokenizer_3``, or the
    files beside a text-encoder file) or the shipped T5 v1.1 files. A ``folder`` without tokenizer files is
    refused, naming the files it should hold."""
    from transformers import T5TokenizerFast

    folder = folder or T5_TOKENIZER_DIR
    if not any(os.path.isfile(os.path.join(folder, f)) for f in T5_FILES):
        fix = ("run `python tools/derive_t5_tokenizer.py` to recreate them" if folder == T5_TOKENIZER_DIR else
               "copy the model's tokenizer folder completely, or remove it to use the studio's T5 tokenizer")
        raise ModelLoadError(f"The T5 tokenizer in {folder} is missing: neither tokenizer.json nor spiece.model "
                             "is there.", path=folder, fix=fix + ".")
    return T5TokenizerFast.from_pretrained(folder, model_max_length=max_length, local_files_only=True)
