"""``quantize=int8`` on FLUX.1: the transformer and both text encoders held as int8 (a transformer is nearly all
linear layers), pictures close to the float ones, and a kohya LoRA on a fused layer (split by rows) patched into
the int8 parts and restored exactly."""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from studio import quantize
from studio.adapters import patcher_for
from studio.adapters.lora_files import load_lora_file
from tests.families.test_flux_generation import px, req
from tests.families.test_flux_lora import ALPHA, RANK, WEIGHT, kohya_flux_lora

NAME = "flux1-dev-tiny.safetensors"


def test_int8_flux_is_close_and_takes_lora_on_fused_layers(flux_studio, tmp_path):
    plain = flux_studio.generate(req())
    with flux_studio.manager.acquire(NAME, "Automatic") as loaded:
        float_bytes = quantize.module_bytes(loaded.components.unet)
    flux_studio.settings.quantize = "int8"
    q = flux_studio.generate(req())
    assert not q.warnings
    diff = np.abs(px(plain.images[0]) - px(q.images[0]))
    assert 0 < diff.mean() < 3.0, diff.mean()
    with flux_studio.manager.acquire(NAME, "Automatic") as loaded:
        c = loaded.components
        linear = [m for m in c.unet.modules() if isinstance(m, torch.nn.Linear)]
        assert all(quantize.is_quantised(m.weight) for m in linear)
        assert any(quantize.is_quantised(m.weight) for m in c.text_encoder_2.modules() if hasattr(m, "weight"))
        # fp32 here: the transformer, nearly all linear, drops to about a quarter (plus scales, norms, biases)
        assert quantize.module_bytes(c.unet) < 0.35 * float_bytes
        block = c.unet.single_transformer_blocks[0]
        parts = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
        before = [(p.weight.qdata.clone(), p.weight.scale.clone()) for p in parts]
        values = [quantize.dequantised(p.weight) for p in parts]
        path = tmp_path / "linear1.safetensors"
        sd = kohya_flux_lora(c, ["single_blocks_0_linear1"], seed=3)
        save_file(sd, str(path))
        key = "lora_unet_single_blocks_0_linear1"
        delta = (sd[key + ".lora_up.weight"] @ sd[key + ".lora_down.weight"]) * (ALPHA / RANK) * WEIGHT
        patcher = patcher_for(c)
        try:
            assert patcher.apply([(load_lora_file(path), WEIGHT, WEIGHT)]) == []
            start = 0
            for part, value in zip(parts, values):
                rows = value.shape[0]
                want = value + delta[start:start + rows]
                step = want.abs().amax(dim=1, keepdim=True) / 127        # one int8 step of each row
                assert quantize.is_quantised(part.weight)
                assert ((quantize.dequantised(part.weight) - want).abs() <= 0.51 * step + 1e-7).all()
                start += rows
        finally:
            patcher.restore()
        for part, (qdata, scale) in zip(parts, before):
            assert torch.equal(part.weight.qdata, qdata) and torch.equal(part.weight.scale, scale)
    flux_studio.settings.quantize = "none"
