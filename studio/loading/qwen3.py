"""A Qwen3 text encoder (Z-Image's Qwen3-4B) from HF-named tensors, its config read off them."""
from __future__ import annotations

import re

from ..errors import ModelLoadError

# what the weights cannot say, as Qwen/Qwen3-4B's config.json has it
QWEN3_FIXED = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": True,
               "attention_bias": False, "use_sliding_window": False, "bos_token_id": 151643,
               "eos_token_id": 151645, "use_cache": False}


def qwen3_state(sd: dict, prefix: str) -> dict:
    """The Qwen3Model tensors under ``prefix``: ComfyUI / causal-LM files name them ``model.*`` beside an
    ``lm_head`` (tied to the input embedding, and not part of an encoder)."""
    state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("lm_head.")}


def qwen3_config(shapes: dict) -> dict:
    """Qwen3Config kwargs for Qwen3Model tensors (``embed_tokens.weight``, ``layers.N.self_attn.*``)."""
    def shape(key):
        if key not in shapes:
            raise ModelLoadError(f"The Qwen3 text encoder has no {key}; it is not a Qwen3 encoder.",
                                 fix="use a Qwen3 text-encoder file (qwen_3_4b.safetensors or a diffusers "
                                     "text_encoder folder)")
        return shapes[key]
    vocab, hidden = shape("embed_tokens.weight")
    head = int(shape("layers.0.self_attn.q_norm.weight")[0])
    pat = re.compile(r"layers\.(\d+)\.")
    layers = len({m.group(1) for k in shapes if (m := pat.match(k))})
    return {"vocab_size": int(vocab), "hidden_size": int(hidden), "head_dim": head,
            "num_attention_heads": int(shape("layers.0.self_attn.q_proj.weight")[0]) // head,
            "num_key_value_heads": int(shape("layers.0.self_attn.k_proj.weight")[0]) // head,
            "intermediate_size": int(shape("layers.0.mlp.gate_proj.weight")[0]), "num_hidden_layers": layers,
            "max_window_layers": layers, **QWEN3_FIXED}


def load_qwen3(sd: dict, prefix: str, *, path: str, dtype, device):
    """HF-named Qwen3 tensors under ``prefix`` -> transformers' Qwen3Model."""
    from transformers import Qwen3Config, Qwen3Model

    from .ldm_config import shapes_of
    from .single_file import build_module
    state = qwen3_state(sd, prefix)
    cfg = qwen3_config(shapes_of(state))
    return build_module(lambda: Qwen3Model(Qwen3Config(**cfg)), state, what="Qwen3 text encoder", path=path,
                        dtype=dtype, device=device, config=cfg)
