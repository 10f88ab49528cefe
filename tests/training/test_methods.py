"""LoHa / LoKr (LyCORIS files through our adapter engine), Textual Inversion, DreamBooth prior, resume."""
from __future__ import annotations

import json

import pytest
import torch

from tests.training.helpers import fresh_base


@pytest.mark.parametrize("method,keys", [("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
                                         ("lokr", ("lokr_w1",))])
def test_lycoris_keys_and_our_engine(make_cfg, method, keys):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open
    from studio.adapters import AdapterPatcher, load_lora_file
    from studio.training.trainer import Trainer
    cfg = make_cfg(method=method, conv_rank=2, conv_alpha=1.0, max_steps=2, learning_rate=1e-2, output_name=method)
    t = Trainer(cfg)
    result = t.run()
    with safe_open(str(result.output), "pt") as f:
        names, meta = list(f.keys()), f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    # kohya: json.dumps of the key=value network arguments, every value a string
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0", "algo": method}
    for k in keys:
        assert any(n.endswith("." + k) for n in names), k
    assert any("resnets_0_conv1" in n for n in names)          # conv layers (LoCon-style) included
    lf = load_lora_file(result.output)
    assert lf.kind == method and not lf.unknown_keys
    base = fresh_base(t.cfg)
    before = {n: m.weight.detach().clone() for n, m in base.unet.named_modules()
              if isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
    AdapterPatcher(base).apply([(lf, 1.0, 1.0)])
    checked = 0
    for name, layer in t.c.unet.named_modules():
        if isinstance(layer, BaseTunerLayer):
            delta = layer.get_delta_weight("default").float()
            got = dict(base.unet.named_modules())[name].weight - before[name]
            assert torch.allclose(got, delta.reshape(got.shape), atol=1e-5), name
            checked += 1
    assert checked > 10


def test_textual_inversion_changes_only_its_token(make_cfg):
    from safetensors.torch import load_file
    from studio.loading.diffusers_export import make_pipeline
    from studio.training.trainer import Trainer
    cfg = make_cfg(method="textual_inversion", token="shpx", init_word="shape", num_vectors=2, max_steps=3,
                   learning_rate=5e-2, output_name="shpx")
    t = Trainer(cfg)
    result = t.run()
    assert result.output.parent.name == "embeddings" and result.output.name == "shpx.safetensors"
    emb = load_file(str(result.output))["emb_params"]
    assert emb.shape == (2, 32)
    base = fresh_base(t.cfg)
    w0 = base.text_encoder.get_input_embeddings().weight
    w1 = t.c.text_encoder.get_input_embeddings().weight
    assert torch.equal(w1[: w0.shape[0]], w0)                      # every old row bit-exact
    init = w0[base.tokenizer.encode("shape", add_special_tokens=False)[0]]
    assert not torch.allclose(emb[0], init)                           # the new rows learnt something
    pipe = make_pipeline(fresh_base(t.cfg))
    ref = make_pipeline(fresh_base(t.cfg))
    pipe.load_textual_inversion(str(result.output), token="shpx")

    def enc(p, text):
        ids = p.tokenizer(p.maybe_convert_prompt(text, p.tokenizer), padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
        with torch.no_grad():
            return p.text_encoder(ids)[0]
    assert torch.allclose(enc(pipe, "a red circle"), enc(ref, "a red circle"))
    assert not torch.allclose(enc(pipe, "a shpx circle"), enc(ref, "a shape circle"))


def test_dreambooth_prior_with_studio_generated_class_images(studio, settings, make_cfg, tmp_path):
    from studio.training.runner import prepare_class_images
    from studio.training.trainer import Trainer
    ckpt = settings.ckpt_path / "tiny-sd1.safetensors"
    cfg = make_cfg(method="dreambooth_lora", base_model=str(ckpt), instance_prompt="shp shape",
                   class_prompt="a shape", class_images_dir=str(tmp_path / "class"), num_class_images=2,
                   prior_loss_weight=0.5, max_steps=2)
    prepare_class_images(cfg, studio)
    made = sorted((tmp_path / "class").glob("*.png"))
    assert len(made) == 2 and (tmp_path / "class" / "class_00000.txt").read_text().strip() == "a shape"
    events = []
    result = Trainer(cfg, on_event=events.append).run()
    steps = [e for e in events if e["type"] == "step"]
    assert all(e["prior_loss"] is not None and e["prior_loss"] > 0 for e in steps)
    assert result.vae_encodes == 4 + 2                  # instance images and class images, once each
    prepare_class_images(cfg, studio)                   # enough now: nothing new
    assert sorted((tmp_path / "class").glob("*.png")) == made


def test_resume_continues_with_same_losses(make_cfg, tmp_path):
    from studio.training.progress import StopRequest
    from studio.training.trainer import Trainer
    full = Trainer(make_cfg(max_steps=6, run_dir=str(tmp_path / "a"), output_name="a")).run()
    cfg = make_cfg(max_steps=6, run_dir=str(tmp_path / "b"), output_name="b")
    stop = StopRequest(tmp_path / "b")

    def on_event(e):
        if e["type"] == "step" and e["step"] == 3:
            stop.request()
    first = Trainer(cfg, on_event=on_event, stop=stop).run()
    assert first.stopped and first.steps == 3 and first.output.is_file()   # Stop leaves a usable LoRA
    cfg.resume = True
    second = Trainer(cfg).run()
    assert second.steps == 6 and not second.stopped and len(second.losses) == 3
    assert torch.allclose(torch.tensor(first.losses + second.losses), torch.tensor(full.losses), atol=1e-5), (
        first.losses, second.losses, full.losses)


def test_options_vpred_minsnr_accum_checkpointing_adafactor(make_cfg):
    """The less common switches run together and land in the metadata (v target, min-SNR, noise offset ...)."""
    from safetensors import safe_open
    from studio.training.trainer import Trainer
    cfg = make_cfg(prediction="v_prediction", min_snr_gamma=5.0, noise_offset=0.05, grad_accum=2, max_steps=2,
                   gradient_checkpointing=True, optimizer="Adafactor", lr_scheduler="cosine_with_restarts",
                   flip=True, shuffle_caption=True, keep_tokens=1, caption_dropout=0.1, method="locon",
                   enable_buckets=False, mixed_precision="bf16", clip_skip=2, output_name="opts")
    t = Trainer(cfg)
    result = t.run()
    assert t.noise_sched.config.prediction_type == "v_prediction"
    assert result.steps == 2 and result.vae_encodes == 8          # flip: each image cached both ways, once
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_optimizer"] == ("transformers.optimization.Adafactor(scale_parameter=False,relative_step=False,"
                                    "warmup_init=False,weight_decay=0.01)")
    assert meta["ss_mixed_precision"] == "bf16"
    assert meta["ss_clip_skip"] == "2" and "conv_dim" in meta["ss_network_args"]
