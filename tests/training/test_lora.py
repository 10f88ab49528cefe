"""One short LoRA run (UNet + text encoder), checked from every side: loss, outputs, metadata, loaders."""
from __future__ import annotations

import json

import pytest
import torch

from tests.training.helpers import eval_loss, fresh_base


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, train_store):
    import shutil
    from studio.training import TrainConfig
    from studio.training.trainer import Trainer
    from tests.training.conftest import write_dataset
    root = tmp_path_factory.mktemp("lora")
    models = root / "models"
    shutil.copytree(train_store, models)
    ds = write_dataset(root / "dataset", 4)
    cfg = TrainConfig(base_model=str(models / "Stable-diffusion" / "tiny-sd1.safetensors"), dataset_dir=str(ds),
                      resolution=64, min_image_side=32, rank=4, alpha=2.0, learning_rate=1e-2, max_steps=16,
                      batch_size=2, seed=3, train_text_encoder=True, text_encoder_lr=1e-3, output_name="shp",
                      sample_prompts="a shp circle --w 64 --h 64 --s 2 --d 7", sample_every=8, save_every=8,
                      run_dir=str(root / "run"), lr_scheduler="cosine", lr_warmup_steps=2)
    events = []
    trainer = Trainer(cfg, on_event=events.append)
    result = trainer.run()
    return trainer, result, events


def test_loss_goes_down(lora_run):
    trainer, result, _ = lora_run
    base = fresh_base(trainer.cfg)
    before = eval_loss(base, trainer.cfg)
    after = eval_loss(trainer.c, trainer.cfg)   # the trained (peft-injected) modules
    assert after < before * 0.97, (before, after)
    assert len(result.losses) == 16 and all(l == l for l in result.losses)


def test_outputs_events_and_samples(lora_run):
    trainer, result, events = lora_run
    cfg = trainer.cfg
    assert result.output.name == "shp.safetensors" and result.output.parent.name == "Lora"
    assert [p.split("/")[-1] for p in result.intermediate] == ["shp-000008.safetensors"]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 17))
    assert all(k in steps[-1] for k in ("loss", "lr", "it_s", "eta", "epoch", "total"))
    samples = sorted(p.split("/")[-1] for p in result.samples)
    assert samples == ["step000000_00.png", "step000008_00.png", "step000016_00.png"]
    lines = (trainer.run_dir / "progress.jsonl").read_text().splitlines()
    assert [json.loads(x)["type"] for x in lines] == kinds
    assert result.vae_encodes == 4            # each image encoded once (RAM cache)
    assert not list(cfg.output_dir and __import__("pathlib").Path(cfg.output_dir).glob(".*.tmp"))


def test_metadata(lora_run):
    from safetensors import safe_open
    from studio.hashes import addnet_hash_raw, sha256_file
    trainer, result, _ = lora_run
    with safe_open(str(result.output), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "16" and meta["ss_num_train_images"] == "4" and meta["ss_seed"] == "3"
    assert meta["ss_unet_lr"] == "0.01" and meta["ss_text_encoder_lr"] == "0.001"
    assert meta["ss_lr_scheduler"] == "cosine" and meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    assert json.loads(meta["ss_tag_frequency"])["dataset"]["shp"] == 4
    assert json.loads(meta["ss_dataset_dirs"]) == {"dataset": {"n_repeats": 1, "img_count": 4}}
    assert meta["ss_sd_model_name"] == "tiny-sd1.safetensors"
    assert meta["ss_new_sd_model_hash"] == sha256_file(trainer.cfg.base_model)
    assert meta["sshs_model_hash"] == addnet_hash_raw(result.output)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.title"] == "shp"
    assert meta["modelspec.trigger_phrase"] == "shp"
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert any(k.endswith("proj_in.alpha") for k in keys) and any("ff_net_0_proj" in k for k in keys)


def _formula(path) -> dict[str, torch.Tensor]:
    """ΔW per kohya layer name straight from the file: up @ down * alpha / r."""
    from safetensors.torch import load_file
    sd = load_file(str(path))
    out = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            base = k[: -len(".lora_down.weight")]
            down, up = sd[k].float(), sd[base + ".lora_up.weight"].float()
            scale = float(sd[base + ".alpha"]) / down.shape[0]
            out[base] = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale
    return out


def _weights(components) -> dict[str, torch.Tensor]:
    out = {}
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for n, m in getattr(components, part).named_modules():
            if isinstance(getattr(m, "weight", None), torch.nn.Parameter):
                out[prefix + n.removeprefix("text_model.").replace(".", "_")] = m.weight.detach().clone()
    return out


def test_diffusers_load_lora_weights_matches_formula_and_our_engine(lora_run):
    from studio.adapters import AdapterPatcher, load_lora_file
    from studio.loading.diffusers_export import make_pipeline
    trainer, result, _ = lora_run
    deltas = _formula(result.output)
    base = fresh_base(trainer.cfg)
    w0 = _weights(base)
    # 1) diffusers' own loader (fused into the weights so they can be compared)
    pipe = make_pipeline(fresh_base(trainer.cfg))
    pipe.load_lora_weights(str(result.output))
    pipe.fuse_lora(lora_scale=1.0)
    wd = _weights(pipe)
    # 2) our adapter engine
    AdapterPatcher(base).apply([(load_lora_file(result.output), 1.0, 1.0)])
    wo = _weights(base)
    unet_layers = [k for k in deltas if k.startswith("lora_unet_")]
    te_layers = [k for k in deltas if k.startswith("lora_te_")]
    assert len(unet_layers) > 10 and len(te_layers) == 12
    for k in deltas:
        expect = w0[k] + deltas[k]
        assert torch.allclose(wo[k], expect, atol=1e-5), k
        if k.startswith("lora_unet_"):
            assert torch.allclose(wd[k], expect, atol=1e-5), k
    te_changed = [k for k in te_layers if not torch.equal(wd[k], w0[k])]
    # transformers 5 flattened CLIPTextModel; diffusers may not find kohya's text_model names there
    if te_changed:
        for k in te_layers:
            assert torch.allclose(wd[k], w0[k] + deltas[k], atol=1e-5), k


def test_trained_modules_equal_exported_file(lora_run):
    """What training ends with (peft layers) is what the file gives: same UNet output."""
    from studio.adapters import AdapterPatcher, load_lora_file
    trainer, result, _ = lora_run
    base = fresh_base(trainer.cfg)
    AdapterPatcher(base).apply([(load_lora_file(result.output), 1.0, 1.0)])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = trainer.c.tokenizer(["a shp circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for m in trainer.c.modules().values():
            m.eval()
        a = trainer.c.unet(x, 500, trainer.c.text_encoder(ids)[0]).sample
        b = base.unet(x, 500, base.text_encoder(ids)[0]).sample
    assert torch.allclose(a, b, atol=1e-4)
