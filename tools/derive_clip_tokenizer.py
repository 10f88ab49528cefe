"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) offline from open_clip's merges file.

Run once: ``python tools/derive_clip_tokenizer.py [out_dir]``; the result ships in studio/loading/clip_tokenizer/.
The vocabulary is built the way CLIP builds it: 256 byte-unicode symbols, the same with ``</w>``, one entry per
merge (the pair joined), then the two special tokens -> 49408 entries.
"""
from __future__ import annotations

import gzip
import json
import os
import sys

N_MERGES = 49152 - 256 - 2  # 48894: CLIP's vocab size minus byte symbols and the two specials


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode mapping (same order CLIP uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def derive(bpe_gz_path: str, out_dir: str) -> None:
    with gzip.open(bpe_gz_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a header
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **special}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def main() -> None:
    import open_clip  # only needed to locate the merges file

    src = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "studio", "loading", "clip_tokenizer")
    derive(src, out)
    print(f"wrote CLIP tokenizer files to {out}")


if __name__ == "__main__":
    main()
