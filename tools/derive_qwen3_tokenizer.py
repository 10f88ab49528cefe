"""Derive the Qwen3 tokenizer files (Z-Image's text encoder, Qwen3-4B) offline.

Run once: ``python tools/derive_qwen3_tokenizer.py [out_dir] [--wheel path.whl]``; the result ships in
studio/loading/qwen3_tokenizer/. InvokeAI's wheel (Apache-2.0, as Qwen/Qwen3-4B) carries Qwen's fast-tokenizer
``tokenizer.json`` gzipped (11 MB unpacked, 2 MB packed), with its ``tokenizer_config.json`` (chat template,
special tokens). The studio ships it packed too and unpacks it in memory when loading. This script fetches that
wheel with pip (no dependencies), copies the three files out and checks them against token ids published for the
Qwen2 / Qwen3 vocabulary (tests/families/test_qwen3_tokenizer.py checks the shipped copy the same way).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "invokeai==6.14.2"
INSIDE = "invokeai/backend/qwen3/tokenizer/"
FILES = ("tokenizer.json.gz", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "studio", "loading", "qwen3_tokenizer")


def _copy(wheel: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in FILES:
            with z.open(INSIDE + name) as src, open(os.path.join(out_dir, name), "wb") as dst:
                dst.write(src.read())


def derive(out_dir: str, wheel: str | None = None) -> None:
    if wheel:
        _copy(wheel, out_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
            _copy(next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")), out_dir)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from studio.loading.tokenizers import load_qwen3_tokenizer
    tok = load_qwen3_tokenizer(out_dir)
    # ids published for the Qwen2 vocabulary, which Qwen3 keeps (transformers' Qwen2 tokenizer tests)
    assert tok("Hey how are you doing").input_ids == [18665, 1246, 525, 498, 3730]
    assert tok("<|im_start|>Hello, world!<|im_end|>\n").input_ids == [151644, 9707, 11, 1879, 0, 151645, 198]
    print(f"wrote {', '.join(FILES)} to {os.path.abspath(out_dir)} ({len(tok)} tokens)")


if __name__ == "__main__":
    args = sys.argv[1:]
    whl = None
    if "--wheel" in args:
        i = args.index("--wheel")
        whl = args[i + 1]
        del args[i:i + 2]
    derive(args[0] if args else DEFAULT_OUT, whl)
