"""SD3.5 LoRAs in the formats people download: diffusers / peft (what diffusers' own trainer and ai-toolkit write)
and kohya sd-scripts' ``sd3_train_network`` (Stability's MMDiT names, fused q / k / v), patched into the live
weights as diffusers' load_lora_weights + fuse_lora does."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from studio.adapters import patcher_for
from studio.adapters.lora_files import load_lora_file
from tests.families.test_sd3 import sd3_store, sd3_studio  # noqa: F401 - fixtures

RANK, ALPHA, WEIGHT = 4, 2.0, 0.7


@pytest.fixture()
def sd3(sd3_studio):  # noqa: F811
    with sd3_studio.manager.acquire("sd3.5_medium_tiny.safetensors", "Automatic") as loaded:
        yield loaded.components


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _fused(c, peft: dict) -> dict:
    """diffusers' StableDiffusion3Pipeline with ``peft`` loaded and fused at WEIGHT: its transformer's weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=c.vae,
                                    text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                    text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                                    text_encoder_3=c.text_encoder_3, tokenizer_3=c.tokenizer_3,
                                    transformer=copy.deepcopy(c.unet))
    pipe.load_lora_weights(peft, adapter_name="x")
    pipe.fuse_lora(lora_scale=WEIGHT, adapter_names=["x"], components=["transformer"])
    pipe.unload_lora_weights()
    return _state(pipe.transformer)


def _applied(c, path, family: str | None = "sd3") -> tuple[dict, list]:
    """Our patched transformer weights for the file at WEIGHT (its family read as ``family``), and the weights
    back after restore."""
    lf = load_lora_file(path)
    assert lf.family == family and not lf.unknown_keys, (lf.family, lf.unknown_keys)
    before = _state(c.unet)
    patcher = patcher_for(c)
    try:
        assert patcher.apply([(lf, WEIGHT, WEIGHT)]) == []
        got = _state(c.unet)
    finally:
        patcher.restore()
    after = _state(c.unet)
    assert all(torch.equal(after[k], before[k]) for k in before)
    return got, [k for k in got if not torch.equal(got[k], before[k])]


def _pair(g, rows: int, cols: int):
    return torch.randn(RANK, cols, generator=g) * 0.1, torch.randn(rows, RANK, generator=g) * 0.1


def test_diffusers_peft_sd3_lora_equals_load_lora_weights_and_fuse(sd3, tmp_path):
    g, sd = torch.Generator().manual_seed(1), {}
    mods = dict(sd3.unet.named_modules())
    for m in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
              "transformer_blocks.0.attn2.to_v", "transformer_blocks.1.ff.net.2", "proj_out"):
        w = mods[m].weight
        down, up = _pair(g, w.shape[0], w.shape[1])
        sd[f"transformer.{m}.lora_A.weight"], sd[f"transformer.{m}.lora_B.weight"] = down, up
    save_file(sd, str(tmp_path / "peft_sd3.safetensors"))
    # diffusers' names are shared with FLUX ("transformer_blocks") and carry no metadata: the file does not say
    # its family, and is applied by fit
    got, changed = _applied(sd3, tmp_path / "peft_sd3.safetensors", family=None)
    ref = _fused(sd3, sd)
    for k in got:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)
    assert {k.rsplit(".", 1)[0] for k in changed} == {k[len("transformer."):-len(".lora_A.weight")]
                                                      for k in sd if k.endswith("lora_A.weight")}


def test_kohya_sd3_lora_in_stability_names_equals_its_diffusers_twin(sd3, tmp_path):
    """The fused layers of a kohya file split by rows onto diffusers' modules: the same weights as the same LoRA
    written in diffusers' names (each part's rows of the up matrix, alpha / rank folded in) fused by diffusers."""
    g = torch.Generator().manual_seed(2)
    mods = dict(sd3.unet.named_modules())
    layers = {"joint_blocks_0_x_block_attn_qkv": ["transformer_blocks.0.attn.to_" + q for q in "qkv"],
              "joint_blocks_0_context_block_attn_qkv": [f"transformer_blocks.0.attn.add_{q}_proj" for q in "qkv"],
              "joint_blocks_0_x_block_attn2_qkv": ["transformer_blocks.0.attn2.to_" + q for q in "qkv"],
              "joint_blocks_1_x_block_attn_proj": ["transformer_blocks.1.attn.to_out.0"],
              "joint_blocks_0_context_block_mlp_fc1": ["transformer_blocks.0.ff_context.net.0.proj"],
              "joint_blocks_1_x_block_adaLN_modulation_1": ["transformer_blocks.1.norm1.linear"],
              "final_layer_linear": ["proj_out"]}
    kohya, twin = {}, {}
    for name, parts in layers.items():
        rows = sum(mods[p].weight.shape[0] for p in parts)
        down, up = _pair(g, rows, mods[parts[0]].weight.shape[1])
        key = "lora_unet_" + name
        kohya.update({key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(ALPHA)})
        start = 0
        for p in parts:
            n = mods[p].weight.shape[0]
            twin[f"transformer.{p}.lora_A.weight"] = down
            twin[f"transformer.{p}.lora_B.weight"] = up[start:start + n] * (ALPHA / RANK)
            start += n
    save_file(kohya, str(tmp_path / "kohya_sd3.safetensors"),
              metadata={"ss_base_model_version": "sd3", "ss_network_module": "networks.lora_sd3"})
    got, changed = _applied(sd3, tmp_path / "kohya_sd3.safetensors")
    ref = _fused(sd3, twin)
    for k in got:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)
    assert len({k.rsplit(".", 1)[0] for k in changed}) == sum(len(p) for p in layers.values())


def test_an_sd3_lora_changes_the_picture_and_weight_zero_does_not(sd3_studio, tmp_path):  # noqa: F811
    import numpy as np

    from studio.request import GenerationRequest
    from tests.families.test_sd3 import BASE, px
    with sd3_studio.manager.acquire("sd3.5_medium_tiny.safetensors", "Automatic") as loaded:
        inner = loaded.components.unet.transformer_blocks[0].attn.to_q.weight.shape[0]
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(RANK, inner, generator=g), torch.randn(3 * inner, RANK, generator=g)
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    sd3_studio.settings.lora_path.mkdir(parents=True, exist_ok=True)
    save_file({key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(4.0)},
              str(sd3_studio.settings.lora_path / "sd3_style.safetensors"))
    sd3_studio.registry.refresh()
    plain = px(sd3_studio.generate(GenerationRequest(**BASE)).images[0])
    zero = px(sd3_studio.generate(GenerationRequest(**{**BASE, "prompt": BASE["prompt"] + " <lora:sd3_style:0>"})).images[0])
    styled = sd3_studio.generate(GenerationRequest(**{**BASE, "prompt": BASE["prompt"] + " <lora:sd3_style:1>"}))
    assert np.array_equal(plain, zero)
    assert np.abs(px(styled.images[0]) - plain).mean() > 1
    assert "sd3_style" in styled.infotexts[0]
