"""FLUX.1 LoRA training (kohya sd-scripts' flux_train_network target set), kohya-format output: the loss goes
down, the file names BFL layers (fused q / k / v as one layer) and computes exactly what was trained, in the
studio's loader and in diffusers' load_lora_weights."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.errors import StudioError

RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, flux_store):
    from studio.training import TrainConfig
    from studio.training.trainer import Trainer
    from tests.training.conftest import write_dataset
    root = tmp_path_factory.mktemp("flux-train")
    models = root / "models"
    shutil.copytree(flux_store, models)
    ds = write_dataset(root / "dataset", 4)
    cfg = TrainConfig(base_model=str(models / "Stable-diffusion" / "flux1-dev-tiny.safetensors"),
                      dataset_dir=str(ds), resolution=64, min_image_side=32, rank=RANK, alpha=ALPHA,
                      learning_rate=1e-2, max_steps=12, batch_size=2, seed=5, train_text_encoder=True,
                      text_encoder_lr=1e-3, output_name="flux-shp", run_dir=str(root / "run"),
                      sample_prompts="a shp circle --w 64 --h 64 --s 2 --d 7 --g 3.5", sample_every=12)
    events = []
    trainer = Trainer(cfg, on_event=events.append)
    return trainer, trainer.run(), events


@torch.no_grad()
def _flow_eval(c, cfg) -> float:
    """The flow loss over the dataset at fixed times and noise (the same draws for every model)."""
    from studio.training.buckets import LatentCache
    from studio.training.dataset import scan_dataset
    from studio.training.losses import encode_text
    items = scan_dataset(cfg.dataset_dir, min_side=32).items
    cache = LatentCache(c.vae)
    lat = torch.stack([cache.get(i.path, (cfg.resolution, cfg.resolution), False) for i in items])
    cond = encode_text(c, [i.caption for i in items])
    gen = torch.Generator().manual_seed(11)
    total = 0.0
    for s in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(lat.shape, generator=gen)
        sig = torch.full((len(items),), s)
        pred = c.spec.flow_prediction(c.unet, (1 - s) * lat + s * noise, sig, cond, 1.0)
        total += torch.nn.functional.mse_loss(pred, noise - lat).item()
    return total / 4


def test_flux_lora_learns_and_samples(flux_run):
    from tests.training.helpers import fresh_base
    trainer, result, events = flux_run
    before = _flow_eval(fresh_base(trainer.cfg), trainer.cfg)
    after = _flow_eval(trainer.c, trainer.cfg)
    assert after < before * 0.97, (before, after)
    assert len(result.losses) == 12 and all(l == l for l in result.losses)
    assert sorted(p.rsplit("/", 1)[-1] for p in result.samples) == ["step000000_00.png", "step000012_00.png"]
    from PIL import Image
    with Image.open(result.samples[-1]) as im:
        assert im.size == (64, 64) and len(set(im.convert("L").getdata())) > 8      # a picture, not a flat fill
    assert events[-1]["type"] == "done"


def test_flux_lora_file_is_kohya_flux(flux_run):
    trainer, result, _ = flux_run
    c = trainer.c
    inner = c.unet.config.num_attention_heads * c.unet.config.attention_head_dim
    mlp = c.unet.single_transformer_blocks[0].proj_mlp.out_features
    sd = load_file(str(result.output))
    layers = {k.split(".", 1)[0] for k in sd}
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_")) for k in layers)
    # sd-scripts' lora_flux set: every Linear of both block kinds, modulation included; nothing outside them
    blocks = {k for k in layers if k.startswith("lora_unet_")}
    assert blocks == {f"lora_unet_double_blocks_0_{m}" for m in (
        "img_mod_lin", "txt_mod_lin", "img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj",
        "img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2")} | {
        f"lora_unet_single_blocks_0_{m}" for m in ("modulation_lin", "linear1", "linear2")}
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert sd[qkv + ".lora_down.weight"].shape == (3 * RANK, inner)
    assert sd[qkv + ".lora_up.weight"].shape == (3 * inner, 3 * RANK)
    assert float(sd[qkv + ".alpha"]) == pytest.approx(3 * ALPHA)       # alpha / rank as trained
    l1 = "lora_unet_single_blocks_0_linear1"
    assert sd[l1 + ".lora_up.weight"].shape == (3 * inner + mlp, 4 * RANK)
    assert not any("text_encoder_2" in k or "lora_te3" in k for k in sd)   # T5 stays frozen (kohya's default)
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_guidance_scale"] == "1.0"
    from studio.adapters.lora_files import load_lora_file
    lf = load_lora_file(result.output)
    assert lf.family == "flux" and not lf.unknown_keys


@torch.no_grad()
def test_flux_lora_file_computes_what_was_trained(flux_run, tmp_path):
    """The file read by the studio's loader onto a fresh base gives the trained model's outputs; diffusers'
    load_lora_weights + fuse_lora gives the same double-block weights (its kohya converter hard-codes the
    released width for single blocks' linear1 and reads no CLIP layers, so those are left to the first check)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from studio.adapters import patcher_for
    from studio.adapters.lora_files import load_lora_file
    from tests.training.helpers import fresh_base
    trainer, result, _ = flux_run
    trained, base = trainer.c, fresh_base(trainer.cfg)
    ref = copy.deepcopy(base.unet)
    assert patcher_for(base).apply([(load_lora_file(result.output), 1.0, 1.0)]) == []
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 16, 8, 8, generator=g)
    cond = {"hidden": torch.randn(1, 7, base.unet.config.joint_attention_dim, generator=g),
            "pooled": torch.randn(1, base.unet.config.pooled_projection_dim, generator=g)}
    sig = torch.tensor([0.5])
    for m in (trained.unet, trained.text_encoder):
        m.eval()
    torch.testing.assert_close(base.spec.flow_prediction(base.unet, lat, sig, cond, 1.0),
                               trained.spec.flow_prediction(trained.unet, lat, sig, cond, 1.0), atol=1e-5, rtol=1e-4)
    ids = trained.tokenizer(["a shp circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(base.text_encoder(ids).pooler_output, trained.text_encoder(ids).pooler_output,
                               atol=1e-5, rtol=1e-4)

    double = {k: v for k, v in load_file(str(result.output)).items() if k.startswith("lora_unet_double_blocks_")}
    path = tmp_path / "double.safetensors"
    save_file(double, str(path))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=base.vae, text_encoder=base.text_encoder,
                        tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                        transformer=ref)
    pipe.load_lora_weights(str(path), adapter_name="k")
    pipe.fuse_lora(lora_scale=1.0, adapter_names=["k"])
    pipe.unload_lora_weights()
    ours = base.unet.transformer_blocks[0].state_dict()
    for k, v in pipe.transformer.transformer_blocks[0].state_dict().items():
        torch.testing.assert_close(ours[k], v, atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("change, field", [({"method": "loha"}, "method.method"),
                                           ({"min_snr_gamma": 5.0}, "training.min_snr_gamma")])
def test_flux_runs_refuse_what_kohya_flux_files_cannot_hold(flux_store, tmp_path, change, field):
    from studio.training import TrainConfig
    from studio.training.trainer import Trainer
    from tests.training.conftest import write_dataset
    models = tmp_path / "models"
    shutil.copytree(flux_store, models)
    cfg = TrainConfig(base_model=str(models / "Stable-diffusion" / "flux1-dev-tiny.safetensors"),
                      dataset_dir=str(write_dataset(tmp_path / "ds", 2)), resolution=64, min_image_side=32,
                      max_steps=1, output_name="x", run_dir=str(tmp_path / "run"), **change)
    with pytest.raises(StudioError) as e:
        Trainer(cfg).run()
    assert e.value.field == field and "FLUX" in str(e.value)
