"""fp8 (e4m3fn) FLUX.1 files, as Comfy-Org and Kijai publish them: kept in fp8 in memory, close to full precision."""
from __future__ import annotations

import numpy as np
import torch

from tests.tinyflux import flux_state_dict


def test_fp8_file_stays_fp8_in_memory_and_draws_close_to_full_precision(flux_studio):
    from safetensors.torch import save_file
    s = flux_studio.settings
    with flux_studio.manager.acquire("flux1-dev-tiny.safetensors", "Automatic") as loaded:
        full = loaded.components
        full_bytes = sum(p.numel() * 2 for p in full.unet.parameters())      # what bf16 would hold
    sd = flux_state_dict(full)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and v.ndim == 2 else v)
           .contiguous() for k, v in sd.items()}
    save_file(fp8, str(s.ckpt_path / "flux1-dev-tiny-fp8.safetensors"))
    flux_studio.registry.refresh()
    from tests.families.test_flux_generation import px, req
    a = flux_studio.generate(req())
    b = flux_studio.generate(req(checkpoint="flux1-dev-tiny-fp8.safetensors"))
    with flux_studio.manager.acquire("flux1-dev-tiny-fp8.safetensors", "Automatic") as loaded:
        c = loaded.components
        held = sum(p.numel() * p.element_size() for p in c.unet.parameters())
        assert c.unet.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
        assert any("kept in float8_e4m3fn" in n for n in c.notes)
        # the manager's budget counts what is really held
        entry = next(e for e in flux_studio.manager._entries.values() if e.value is c)
        assert entry.nbytes < full.nbytes()
    assert held <= 0.6 * full_bytes, (held, full_bytes)
    diff = np.abs(px(a.images[0]) - px(b.images[0]))
    assert 0 < diff.mean() < 6, diff.mean()
