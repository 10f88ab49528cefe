"""FLUX.1 LoRAs in XLabs-AI's format (x-flux, XLabs-AI/flux-lora-collection): processor names, fused q / k / v,
no alpha. Told FLUX by their keys alone, and patched in exactly as diffusers' load_lora_weights + fuse_lora."""
from __future__ import annotations

import copy
import dataclasses
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.adapters import patcher_for
from studio.adapters.lora_files import load_lora_file, parse_state_dict
from studio.prompt_parser import extract_extra_networks
from studio.request import GenerationRequest

RANK = 4
CKPT = "flux1-dev-2x2.safetensors"
BASE = dict(negative_prompt="", width=64, height=64, steps=3, cfg_scale=1.0, distilled_cfg_scale=3.5,
            sampler_name="Euler", scheduler="Automatic", seed=7, save_images=False)


def xlabs_lora(transformer, seed=0) -> dict:
    """Every processor XLabs trains, on every block: double blocks' image (lora1) and text (lora2) q / k / v and
    projections, single blocks' q / k / v (linear1 without its MLP rows) and output projection (linear2)."""
    g = torch.Generator().manual_seed(seed)
    d = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    sd = {}

    def pair(key, out_features, in_features):
        sd[key + ".down.weight"] = torch.randn(RANK, in_features, generator=g) * 0.1
        sd[key + ".up.weight"] = torch.randn(out_features, RANK, generator=g) * 0.1

    for i in range(len(transformer.transformer_blocks)):
        for stream in ("1", "2"):
            pair(f"double_blocks.{i}.processor.qkv_lora{stream}", 3 * d, d)
            pair(f"double_blocks.{i}.processor.proj_lora{stream}", d, d)
    for i in range(len(transformer.single_transformer_blocks)):
        pair(f"single_blocks.{i}.processor.qkv_lora", 3 * d, d)
        pair(f"single_blocks.{i}.processor.proj_lora", d, d + mlp)
    return sd


# what diffusers' converter turns those processors into (one row per trained module)
TOUCHED = {f"transformer_blocks.{i}.attn.{m}" for i in range(2)
           for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")} | \
          {f"single_transformer_blocks.{i}.{m}" for i in range(2)
           for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny FLUX.1 dev with two double and two single blocks (several of each for the LoRA to address)."""
    from diffusers import FluxTransformer2DModel
    from tests.tinyflux import make_tiny_flux, write_flux_single_file
    from tests.tinymodels import _jitter

    c = make_tiny_flux(seed=1)
    torch.manual_seed(11)
    wide = FluxTransformer2DModel.from_config({**c.unet.config, "num_layers": 2, "num_single_layers": 2})
    root = tmp_path_factory.mktemp("flux-xlabs-store")
    (root / "Stable-diffusion").mkdir()
    write_flux_single_file(dataclasses.replace(c, unet=_jitter(wide, 11)), root / "Stable-diffusion" / CKPT)
    return root


@pytest.fixture()
def studio(store, tmp_path):
    from studio.app import Studio
    from studio.settings import Settings

    models = tmp_path / "models"
    shutil.copytree(store, models)
    s = Studio(Settings(models_dir=str(models), data_dir=str(tmp_path / "data"), outdir=str(tmp_path / "outputs"),
                        default_checkpoint=CKPT, preview_every=1))
    yield s
    s.close()


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _write_lora(studio, name: str, sd: dict):
    path = studio.settings.lora_path / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    studio.loras.refresh()
    return path


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_xlabs_lora_equals_diffusers_load_lora_weights_and_fuse(studio, weight):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    with studio.manager.acquire(CKPT, "Automatic") as loaded:
        c = loaded.components
    before = _state(c.unet)
    path = _write_lora(studio, "xlabs_style", xlabs_lora(c.unet, seed=3))

    ref = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config), vae=c.vae,
                       text_encoder=c.text_encoder, tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2,
                       tokenizer_2=c.tokenizer_2, transformer=copy.deepcopy(c.unet))
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path), adapter_name="x")
    ref.fuse_lora(lora_scale=weight, adapter_names=["x"])
    ref.unload_lora_weights()

    # through the prompt syntax, as a user writes it
    prompt = f"a red circle on a blue square <lora:xlabs_style:{weight}>"
    ours = studio.generate(GenerationRequest(prompt=prompt, **BASE))
    assert not ours.warnings, ours.warnings
    assert 'Lora hashes: "xlabs_style: ' in ours.infotexts[0]
    theirs = ref(prompt=extract_extra_networks(prompt)[0], height=64, width=64, num_inference_steps=3,
                 guidance_scale=3.5, generator=torch.Generator().manual_seed(7)).images[0]
    # CPU BLAS results depend a little on where tensors sit in memory: a deepcopy of bit-equal weights moves an
    # odd pixel by one level (checked while writing this test), so pixels get that slack and weights none
    diff = np.abs(_px(ours.images[0]) - _px(theirs))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001

    # the weights the studio generated with (its patch stays in until the next job asks for another set)
    lf = load_lora_file(path)
    patcher = patcher_for(c)
    assert patcher.apply([(lf, weight, weight)]) == []
    a, b = _state(c.unet), _state(ref.transformer)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    assert {k.rsplit(".", 1)[0] for k in a if not torch.equal(a[k], before[k])} == TOUCHED
    plain = studio.generate(GenerationRequest(prompt="a red circle on a blue square", **BASE))
    assert all(torch.equal(v, before[k]) for k, v in _state(c.unet).items())   # restored for a job without it
    assert (np.abs(_px(plain.images[0]) - _px(ours.images[0])) > 1).any()


def test_xlabs_lora_is_told_flux_by_its_keys(studio):
    with studio.manager.acquire(CKPT, "Automatic") as loaded:
        sd = xlabs_lora(loaded.components.unet)
    path = _write_lora(studio, "xlabs_badge", sd)
    lf = load_lora_file(path)
    assert lf.family == "flux" and not lf.unknown_keys and len(lf.layers) == 12
    assert all(d.alpha is None and d.scale() == 1.0 for d in lf.layers.values())   # XLabs stores no alpha
    assert studio.loras.find("xlabs_badge").family == "flux"                     # Extra Networks badge
    # ComfyUI-style "diffusion_model." prefix: the same layers
    prefixed = parse_state_dict({"diffusion_model." + k: v for k, v in sd.items()}, name="p", path=path, metadata={})
    assert prefixed.family == "flux" and set(prefixed.layers) == set(lf.layers)


def test_an_xlabs_lora_on_sd1_is_skipped_naming_both(store, tmp_path):
    from tests.tinyflux import make_tiny_flux
    from tests.tinymodels import make_tiny
    path = tmp_path / "xlabs.safetensors"
    save_file(xlabs_lora(make_tiny_flux(seed=1).unet), str(path))
    sd1 = make_tiny("sd1", seed=0)
    before = _state(sd1.unet)
    warnings = patcher_for(sd1).apply([(load_lora_file(path), 1.0, 1.0)])
    assert warnings == ["LoRA 'xlabs' is for FLUX; the loaded checkpoint is SD1 – skipped."]
    assert all(torch.equal(v, before[k]) for k, v in _state(sd1.unet).items())
