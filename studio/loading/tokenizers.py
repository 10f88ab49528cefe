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


QWEN3_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_tokenizer")


def load_qwen3_tokenizer(folder: str | None = None):
    """Qwen3's tokenizer (Z-Image's text encoder) from ``folder`` (a diffusers ``tokenizer/``) or the shipped
    files. The shipped ``tokenizer.json`` is kept gzipped (11 MB unpacked) and unpacked in memory here."""
    import gzip
    import json

    folder = folder or QWEN3_TOKENIZER_DIR
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    packed = os.path.join(folder, "tokenizer.json.gz")
    if not os.path.isfile(packed):
        fix = ("run `python tools/derive_qwen3_tokenizer.py` to recreate them" if folder == QWEN3_TOKENIZER_DIR else
               "copy the model's tokenizer folder completely, or remove it to use the studio's Qwen3 tokenizer")
        raise ModelLoadError(f"The Qwen3 tokenizer in {folder} is missing: no tokenizer.json is there.", path=folder,
                             fix=fix + ".")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    with gzip.open(packed, "rt", encoding="utf-8") as f:
        backend = Tokenizer.from_str(f.read())
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    # the special tokens are in tokenizer.json already; the rest (chat template, eos / pad) is the config's
    cfg = {k: v for k, v in cfg.items() if k not in ("added_tokens_decoder", "tokenizer_class", "auto_map")}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **cfg)
