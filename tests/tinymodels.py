"""Tiny seeded random models for tests (built by studio.demo) and writers for the on-disk formats."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio.demo import make_pipeline, make_tiny, write_diffusers_folder, write_single_file  # noqa: E402,F401


BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "square", "photo", "of"]


def write_tiny_blip(folder, vocab_dir, say: str | None = "red"):
    """A random 1-layer BLIP with a real BERT tokenizer and image processor, saved like the hub folder."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    folder.mkdir(parents=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(BLIP_WORDS) + "\n")
    tok = BertTokenizer(str(vocab_dir / "vocab.txt"))
    proc = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)
    cfg = BlipConfig(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
                     text_config=dict(vocab_size=len(BLIP_WORDS), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                      bos_token_id=2, sep_token_id=3, pad_token_id=0), projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg)
    if say:
        with torch.no_grad():  # a random model would end at once; this one says ``say`` every step
            bias = model.text_decoder.cls.predictions.bias
            bias.fill_(-50.0)
            bias[BLIP_WORDS.index(say)] = 50.0
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
