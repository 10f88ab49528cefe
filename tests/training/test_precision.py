"""Training precision: "auto" per device (CUDA simulated), bf16 for real on the CPU (frozen weights in bf16, trained
tensors in fp32, as on a GPU), caches on the CPU, the caching VAE in fp32 with finite latents."""
from __future__ import annotations

import pytest
import torch

from studio.errors import StudioError


def _cuda(monkeypatch, *, native_bf16: bool):
    """A CUDA card: Ampere or later (native bf16), or older (torch says yes to bf16 only counting emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def test_auto_precision_and_checkpointing_per_device(monkeypatch):
    from studio.training import TrainConfig
    cfg = TrainConfig()
    assert (cfg.mixed_precision, cfg.gradient_checkpointing) == ("auto", "auto")
    cpu = cfg.for_device(False)
    assert (cpu.mixed_precision, cpu.checkpointing) == ("no", False)
    _cuda(monkeypatch, native_bf16=True)
    ampere = cfg.for_device(True)
    assert (ampere.mixed_precision, ampere.checkpointing) == ("bf16", True)
    _cuda(monkeypatch, native_bf16=False)                      # e.g. an RTX 2080 / GTX 1080
    turing = cfg.for_device(True)
    assert (turing.mixed_precision, turing.checkpointing) == ("fp16", True)
    explicit = TrainConfig(mixed_precision="no", gradient_checkpointing="off").for_device(True)
    assert (explicit.mixed_precision, explicit.checkpointing) == ("no", False)
    with pytest.raises(StudioError, match="no bf16") as err:
        TrainConfig(mixed_precision="bf16").validate(check_files=False)
    assert err.value.field == "training.mixed_precision"
    assert cfg.for_device(True).validate(check_files=False).mixed_precision == "fp16"
    # configs written before "auto" said true / false
    assert TrainConfig.from_dict({"training": {"gradient_checkpointing": True}}).gradient_checkpointing == "on"
    assert TrainConfig(gradient_checkpointing=False).gradient_checkpointing == "off"
    with pytest.raises(StudioError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="sometimes").validate(check_files=False)


def test_bf16_textual_inversion_samples(make_cfg):
    """The GPU case on the CPU: a bf16 text encoder around the fp32 embedding table being trained, sampled."""
    from studio.training.trainer import Trainer
    cfg = make_cfg(method="textual_inversion", token="shpx", init_word="shape", max_steps=2, mixed_precision="bf16",
                   sample_prompts="a shpx circle --w 64 --h 64 --s 2", sample_every=2, output_name="tibf16")
    t = Trainer(cfg)
    result = t.run()
    te = t.c.text_encoder
    assert te.get_input_embeddings().weight.dtype == torch.float32
    assert te.get_input_embeddings().weight.dtype != next(te.encoder.parameters()).dtype == torch.bfloat16
    assert t.c.unet.dtype == torch.bfloat16 and t.c.vae.dtype == torch.float32
    assert [p.rsplit("/", 1)[-1] for p in sorted(result.samples)] == ["step000000_00.png", "step000002_00.png"]
    assert all(l == l for l in result.losses) and result.output.is_file()


def test_bf16_lora_keeps_caches_on_the_cpu(make_cfg, monkeypatch):
    from studio.training.trainer import Trainer
    t = Trainer(make_cfg(max_steps=2, mixed_precision="bf16", output_name="lbf16", sample_every=2,
                         sample_at_start=False, sample_prompts="a shp circle --w 64 --h 64 --s 2"))
    result = t.run()
    assert result.steps == 2 and all(l == l for l in result.losses)
    assert len(result.samples) == 1                   # a bf16 UNet's latents through the fp32 VAE
    assert t.c.unet.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in t.net.params["unet"])
    assert t.text_cache and t.cache.ram
    assert all(x.device.type == "cpu" and x.dtype == torch.float32 and torch.isfinite(x).all()
               for x in t.cache.ram.values())
    # the training device as something else than the CPU (as a GPU is): each batch gets a device copy of the
    # cached conditioning, the cache itself stays on the CPU
    monkeypatch.setattr(type(t.acc), "device", property(lambda self: torch.device("meta")))
    t.text_cache.clear()
    cond = t._cond(["shp, a circle"], [(64, 64)])
    assert cond["hidden"].device.type == "meta"
    (entry,) = t.text_cache.values()
    assert entry["hidden"].device.type == "cpu" and not entry["hidden"].requires_grad


def test_latent_cache_refuses_nan_latents(make_cfg):
    from studio.training.buckets import LatentCache
    from studio.training.dataset import scan_dataset
    from tests.training.helpers import fresh_base
    cfg = make_cfg().resolved()
    c = fresh_base(cfg)
    with torch.no_grad():
        c.vae.encoder.conv_in.weight[0, 0, 0, 0] = float("inf")   # what an overflowing fp16 VAE gives
    item = scan_dataset(cfg.dataset_dir, min_side=32).items[0]
    cache = LatentCache(c.vae)
    with pytest.raises(StudioError, match=f"NaN / infinite latents for {item.path.name}") as err:
        cache.get(item.path, (64, 64), False)
    assert "fp32" in err.value.fix and not cache.ram


def test_disk_cache_encodes_nan_latents_again(make_cfg, tmp_path):
    """A disk cache written by an fp16 VAE (NaNs) is not trained on: those latents are encoded again."""
    from safetensors.torch import save_file
    from studio.training.buckets import LatentCache
    from studio.training.dataset import scan_dataset
    from tests.training.helpers import fresh_base
    cfg = make_cfg().resolved()
    item = scan_dataset(cfg.dataset_dir, min_side=32).items[0]
    cache = LatentCache(fresh_base(cfg).vae, mode="disk", folder=tmp_path / "latents")
    good = cache.get(item.path, (64, 64), False)
    file = tmp_path / "latents" / f"{cache.key(item.path, (64, 64), False)}.safetensors"
    save_file({"latent": torch.full_like(good, float("nan"))}, str(file))
    again = LatentCache(cache.vae, mode="disk", folder=tmp_path / "latents")
    assert torch.equal(again.get(item.path, (64, 64), False), good) and again.encodes == 1
