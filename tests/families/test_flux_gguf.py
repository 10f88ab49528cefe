"""GGUF FLUX.1 transformers (ComfyUI-GGUF / city96): read through diffusers' GGUF support, kept quantised, with the
text encoders and VAE from models/text_encoder and models/VAE; close to full precision at about half the bytes."""
from __future__ import annotations

import numpy as np
from safetensors.torch import save_file

from studio.loading.ldm_export import vae_to_ldm
from tests.families.test_flux_generation import px, req
from tests.tinyflux import write_flux_gguf


def test_q8_gguf_transformer_draws_close_to_full_precision(flux_studio):
    s = flux_studio.settings
    with flux_studio.manager.acquire("flux1-dev-tiny.safetensors", "Automatic") as loaded:
        c = loaded.components
    write_flux_gguf(c, s.ckpt_path / "flux1-dev-tiny-Q8_0.gguf")
    s.text_encoder_path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in c.text_encoder.state_dict().items() if not k.endswith("position_ids")},
              str(s.text_encoder_path / "clip_l.safetensors"))
    save_file({k: v.contiguous() for k, v in c.text_encoder_2.state_dict().items()
               if k != "encoder.embed_tokens.weight"}, str(s.text_encoder_path / "t5xxl_fp16.safetensors"))
    s.vae_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae_to_ldm(c.vae.state_dict(), prefix="").items()},
              str(s.vae_path / "ae.safetensors"))
    flux_studio.registry.refresh()
    bf16_bytes = sum(p.numel() * 2 for p in c.unet.parameters())
    a = flux_studio.generate(req())
    b = flux_studio.generate(req(checkpoint="flux1-dev-tiny-Q8_0.gguf"))
    with flux_studio.manager.acquire("flux1-dev-tiny-Q8_0.gguf", "Automatic") as loaded:
        q = loaded.components
        held = sum(p.numel() * p.element_size() for p in q.unet.parameters())
        assert type(q.unet.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
        assert any("GGUF transformer (Q8_0)" in n for n in q.notes)
    assert held <= 0.6 * bf16_bytes, (held, bf16_bytes)
    diff = np.abs(px(a.images[0]) - px(b.images[0]))
    assert 0 < diff.mean() < 6, diff.mean()
