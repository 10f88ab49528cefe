"""Z-Image LoRAs: kohya-style files in diffusers' module names patch the live weights exactly as diffusers'
load_lora_weights + fuse_lora does, and Tongyi's fused q / k / v layer is split by rows."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from studio.adapters import patcher_for
from studio.adapters.lora_files import load_lora_file

RANK, ALPHA, WEIGHT = 4, 2.0, 0.8


@pytest.fixture(scope="module")
def zimage():
    from tests.tinyzimage import make_tiny_zimage
    return make_tiny_zimage(seed=4)


def _lora(layers: dict[str, tuple[int, int]], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (o, i) in layers.items():
        sd[f"lora_unet_{key}.lora_down.weight"] = torch.randn(RANK, i, generator=g) * 0.1
        sd[f"lora_unet_{key}.lora_up.weight"] = torch.randn(o, RANK, generator=g) * 0.1
        sd[f"lora_unet_{key}.alpha"] = torch.tensor(ALPHA)
    return sd


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_kohya_zimage_lora_equals_diffusers_load_lora_weights_and_fuse(zimage, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    d = zimage.unet.config.dim
    ff = zimage.unet.layers[0].feed_forward.w1.out_features
    path = tmp_path / "zimage_kohya.safetensors"
    save_file(_lora({"layers_0_attention_to_q": (d, d), "layers_1_feed_forward_w1": (ff, d),
                     "noise_refiner_0_attention_to_out_0": (d, d)}, seed=1), str(path))
    lf = load_lora_file(path)
    assert lf.family == "zimage" and not lf.unknown_keys

    ref = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=zimage.vae, text_encoder=zimage.text_encoder,
                         tokenizer=zimage.tokenizer, transformer=copy.deepcopy(zimage.unet))
    ref.load_lora_weights(str(path), adapter_name="k")
    ref.fuse_lora(lora_scale=WEIGHT, adapter_names=["k"])
    ref.unload_lora_weights()

    before = _state(zimage.unet)
    patcher = patcher_for(zimage)
    try:
        assert patcher.apply([(lf, WEIGHT, WEIGHT)]) == []
        a, b = _state(zimage.unet), _state(ref.transformer)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
        assert {k.rsplit(".", 1)[0] for k in a if not torch.equal(a[k], before[k])} == {
            "layers.0.attention.to_q", "layers.1.feed_forward.w1", "noise_refiner.0.attention.to_out.0"}
    finally:
        patcher.restore()
    after = _state(zimage.unet)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_tongyi_fused_qkv_layer_is_split_by_rows(zimage, tmp_path):
    d = zimage.unet.config.dim
    sd = _lora({"layers_0_attention_qkv": (3 * d, d)}, seed=2)
    path = tmp_path / "qkv.safetensors"
    save_file(sd, str(path))
    lf = load_lora_file(path)
    key = "lora_unet_layers_0_attention_qkv"
    delta = (sd[key + ".lora_up.weight"] @ sd[key + ".lora_down.weight"]) * (ALPHA / RANK) * WEIGHT
    attn = zimage.unet.layers[0].attention
    parts = [attn.to_q, attn.to_k, attn.to_v]
    before = [p.weight.detach().clone() for p in parts]
    patcher = patcher_for(zimage)
    try:
        assert patcher.apply([(lf, WEIGHT, WEIGHT)]) == []
        for n, (part, orig) in enumerate(zip(parts, before)):
            torch.testing.assert_close(part.weight.detach(), orig + delta[n * d:(n + 1) * d], atol=1e-6, rtol=0)
    finally:
        patcher.restore()
    assert all(torch.equal(p.weight, o) for p, o in zip(parts, before))
