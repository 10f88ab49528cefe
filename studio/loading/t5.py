"""A T5 encoder (Flux's and SD3's long-prompt text encoder) from HF-named tensors, its config read off them."""
from __future__ import annotations

import re

from ..errors import ModelLoadError


def t5_config(shapes: dict, prefix: str = "") -> dict:
    """T5Config kwargs for ``T5EncoderModel`` tensors under ``prefix`` (``shared.weight``, ``encoder.block.N``)."""
    def shape(key):
        if prefix + key not in shapes:
            raise ModelLoadError(f"The T5 text encoder has no {prefix + key}; it is not a T5 encoder.",
                                 fix="use a T5-XXL encoder file (t5xxl_fp16.safetensors or a diffusers text_encoder_2)")
        return shapes[prefix + key]
    vocab, d_model = shape("shared.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    pat = re.compile(re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    layers = len({m.group(1) for k in shapes if (m := pat.match(k))})
    return {"vocab_size": int(vocab), "d_model": int(d_model), "d_kv": int(inner) // int(heads), "d_ff": int(d_ff),
            "num_layers": layers, "num_heads": int(heads), "relative_attention_num_buckets": int(buckets),
            "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": False,
            "use_cache": False, "dropout_rate": 0.0}


def load_t5(sd: dict, prefix: str, *, path: str, dtype, device):
    """HF-named T5 encoder tensors under ``prefix`` -> T5EncoderModel (the tied input embedding is filled in
    when a file stores ``shared.weight`` only, as ComfyUI's do)."""
    from transformers import T5Config, T5EncoderModel

    from .ldm_config import shapes_of
    from .single_file import build_module
    state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    cfg = t5_config(shapes_of(state))
    if "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    model = build_module(lambda: T5EncoderModel(T5Config(**cfg)), state, what="T5 text encoder", path=path,
                         dtype=dtype, device=device, config=cfg)
    # assigned one by one the two names get two Parameters (two copies once cast): tie them as transformers does,
    # or T5-XXL's 32k x 4096 embedding is held (and counted against the budget) twice
    model.encoder.embed_tokens.weight = model.shared.weight
    return model
