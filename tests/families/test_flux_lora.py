"""FLUX.1 LoRAs in the formats people download: kohya / sd-scripts (BFL names, fused q/k/v) and diffusers /
peft (ai-toolkit), patched into the live weights exactly as diffusers' load_lora_weights + fuse_lora does."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from studio.adapters import patcher_for
from studio.adapters.lora_files import load_lora_file

RANK, ALPHA, WEIGHT = 4, 2.0, 0.8


def _pair(g, out_features, in_features):
    return (torch.randn(RANK, in_features, generator=g) * 0.1, torch.randn(out_features, RANK, generator=g) * 0.1)


def kohya_flux_lora(c, layers, seed=0) -> dict:
    """sd-scripts' flux_train_network naming: lora_unet_<BFL module>, lora_te1_<CLIP module>."""
    g = torch.Generator().manual_seed(seed)
    inner = c.unet.config.num_attention_heads * c.unet.config.attention_head_dim
    shapes = {"double_blocks_0_img_attn_qkv": (3 * inner, inner), "double_blocks_0_txt_attn_proj": (inner, inner),
              "single_blocks_0_linear2": (inner, inner + c.unet.single_transformer_blocks[0].proj_mlp.out_features),
              "single_blocks_0_linear1": (3 * inner + c.unet.single_transformer_blocks[0].proj_mlp.out_features,
                                          inner)}
    sd = {}
    for name in layers:
        if name.startswith("te1:"):
            width = c.text_encoder.config.hidden_size
            key, (o, i) = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (width, width)
        else:
            key, (o, i) = "lora_unet_" + name, shapes[name]
        down, up = _pair(g, o, i)
        sd.update({key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(ALPHA)})
    return sd


@pytest.fixture()
def flux(flux_studio):
    with flux_studio.manager.acquire("flux1-dev-tiny.safetensors", "Automatic") as loaded:
        yield loaded.components


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_kohya_flux_lora_equals_diffusers_load_lora_weights_and_fuse(flux, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    path = tmp_path / "kohya_flux.safetensors"
    # diffusers' kohya-FLUX converter hard-codes the released width for linear1 (tested by rows below) and
    # cannot read kohya's CLIP layers back (its text-encoder path finds no lora_A keys): those are left out here
    save_file(kohya_flux_lora(flux, ["double_blocks_0_img_attn_qkv", "double_blocks_0_txt_attn_proj",
                                     "single_blocks_0_linear2"]),
              str(path), metadata={"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"})
    lf = load_lora_file(path)
    assert lf.family == "flux" and not lf.unknown_keys

    ref = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux.vae,
                       text_encoder=copy.deepcopy(flux.text_encoder), tokenizer=flux.tokenizer,
                       text_encoder_2=flux.text_encoder_2, tokenizer_2=flux.tokenizer_2,
                       transformer=copy.deepcopy(flux.unet))
    ref.load_lora_weights(str(path), adapter_name="k")
    ref.fuse_lora(lora_scale=WEIGHT, adapter_names=["k"])
    ref.unload_lora_weights()

    before = _state(flux.unet)
    patcher = patcher_for(flux)
    try:
        assert patcher.apply([(lf, WEIGHT, WEIGHT)]) == []
        a, b = _state(flux.unet), _state(ref.transformer)
        changed = [k for k in a if not torch.equal(a[k], before[k])]
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
        assert {k.rsplit(".", 1)[0] for k in changed} == {
            "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.0.proj_out"}
    finally:
        patcher.restore()
    after = _state(flux.unet)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_fused_single_block_layer_is_split_by_rows_and_clip_layers_apply(flux, tmp_path):
    path = tmp_path / "linear1.safetensors"
    sd = kohya_flux_lora(flux, ["single_blocks_0_linear1", "te1:q"], seed=3)
    save_file(sd, str(path))
    lf = load_lora_file(path)
    key = "lora_unet_single_blocks_0_linear1"
    delta = (sd[key + ".lora_up.weight"] @ sd[key + ".lora_down.weight"]) * (ALPHA / RANK) * WEIGHT
    block = flux.unet.single_transformer_blocks[0]
    parts = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    before = [p.weight.detach().clone() for p in parts]
    q = flux.text_encoder.encoder.layers[0].self_attn.q_proj if hasattr(flux.text_encoder, "encoder") else \
        flux.text_encoder.text_model.encoder.layers[0].self_attn.q_proj
    q_before = q.weight.detach().clone()
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    patcher = patcher_for(flux)
    try:
        assert patcher.apply([(lf, WEIGHT, WEIGHT)]) == []
        torch.testing.assert_close(q.weight.detach(), q_before + (sd[te + ".lora_up.weight"] @ sd[te + ".lora_down.weight"])
                                   * (ALPHA / RANK) * WEIGHT, atol=1e-6, rtol=0)
        start = 0
        for part, orig in zip(parts, before):
            rows = orig.shape[0]
            torch.testing.assert_close(part.weight.detach(), orig + delta[start:start + rows], atol=1e-6, rtol=0)
            start += rows
    finally:
        patcher.restore()


def test_diffusers_peft_flux_lora_applies_and_says_its_family(flux, tmp_path):
    g = torch.Generator().manual_seed(5)
    inner = flux.unet.config.num_attention_heads * flux.unet.config.attention_head_dim
    sd = {}
    for m in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v"):
        down, up = _pair(g, inner, inner)
        sd[f"transformer.{m}.lora_A.weight"], sd[f"transformer.{m}.lora_B.weight"] = down, up
    path = tmp_path / "ai_toolkit.safetensors"
    save_file(sd, str(path))
    lf = load_lora_file(path)
    assert lf.family == "flux"
    before = flux.unet.transformer_blocks[0].attn.to_q.weight.detach().clone()
    patcher = patcher_for(flux)
    try:
        patcher.apply([(lf, 1.0, 1.0)])
        expect = before + sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] @ \
            sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
        torch.testing.assert_close(flux.unet.transformer_blocks[0].attn.to_q.weight.detach(), expect, atol=1e-6,
                                   rtol=0)
    finally:
        patcher.restore()


def test_an_sd_lora_on_flux_is_skipped_naming_both(flux, tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(path),
              metadata={"ss_base_model_version": "sd_v1"})
    warnings = patcher_for(flux).apply([(load_lora_file(path), 1.0, 1.0)])
    assert any("is for SD1; the loaded checkpoint is FLUX" in w for w in warnings)
