"""Derive the T5 v1.1 tokenizer files (Flux's and SD3's ``tokenizer_2`` / ``tokenizer_3``) offline.

Run once: ``python tools/derive_t5_tokenizer.py [out_dir]``; the result ships in studio/loading/t5_tokenizer/.
No package on PyPI ships Google's ``spiece.model`` itself; InvokeAI's wheel carries the same vocabulary as a
fast-tokenizer ``tokenizer.json`` (Apache-2.0, as google/t5-v1_1-xxl). This script fetches that wheel with pip
(no dependencies), copies the three tokenizer files out of it and checks them against token ids published with
the original tokenizer (tests/families/test_t5_tokenizer.py checks the shipped copy the same way).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "invokeai==6.14.2"
INSIDE = "invokeai/backend/t5/tokenizer/"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "studio", "loading", "t5_tokenizer")


def derive(out_dir: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        os.makedirs(out_dir, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in FILES:
                with z.open(INSIDE + name) as src, open(os.path.join(out_dir, name), "wb") as dst:
                    dst.write(src.read())
    from transformers import T5TokenizerFast
    tok = T5TokenizerFast.from_pretrained(out_dir, local_files_only=True)
    # google-t5's own published ids (transformers' T5 tokenizer tests)
    assert tok("The quick brown fox jumps over the lazy dog.").input_ids == \
        [37, 1704, 4216, 3, 20400, 4418, 7, 147, 8, 19743, 1782, 5, 1]
    print(f"wrote {', '.join(FILES)} to {os.path.abspath(out_dir)} ({len(tok)} tokens)")


if __name__ == "__main__":
    derive(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
