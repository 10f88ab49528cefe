"""Checkpoint and LoRA merging on tiny models: every formula checked tensor by tensor."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.errors import StudioError
from studio.hashes import sha256_file
from studio.merge import MergeReport, MergeSpec, merge_checkpoints
from studio.merge.blocks import BLOCK_IDS, presets
from studio.merge.stio import StreamWriter, TensorInfo


@pytest.fixture()
def registry(settings):
    from studio.registry import Registry
    return Registry(settings)


def _ckpt(settings, name):
    return load_file(str(settings.ckpt_path / name))


def _merge(registry, settings, report=None, **kw):
    calls = []
    path = merge_checkpoints(MergeSpec(**kw), registry, settings, progress=lambda d, t, s: calls.append((d, t)),
                             report=report)
    assert calls and calls[-1][0] == calls[-1][1]
    return path


# ---- streaming writer ------------------------------------------------------------------------------------------
def test_stream_writer_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.f32": torch.randn(3, 5, generator=g), "a.f16": torch.randn(7, generator=g).half(),
               "c.bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "d.i64": torch.arange(5),
               "e.bool": torch.tensor([True, False]), "f.scalar": torch.tensor(3.5), "g.empty": torch.zeros(0, 4)}
    plan = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    w = StreamWriter(tmp_path / "x.safetensors", plan, {"k": "v"})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
    w = StreamWriter(tmp_path / "y.safetensors", plan)
    with pytest.raises(ValueError):
        w.write("a.f16", tensors["a.f16"])  # out of order
    with pytest.raises(ValueError):
        w.close()  # incomplete
    w.abort()
    assert not (tmp_path / "y.safetensors").exists()


# ---- formulas ------------------------------------------------------------------------------------------------------
def test_weighted_sum_and_add_difference(registry, settings):
    a, b = _ckpt(settings, "tiny-sd1.safetensors"), _ckpt(settings, "tiny-sd1-b.safetensors")
    c = load_file(str(settings.ckpt_path / "sub" / "tiny-sd1-c.safetensors"))
    report = MergeReport()
    p = _merge(registry, settings, report, a="tiny-sd1", b="tiny-sd1-b", multiplier=0.3, output_name="ws")
    out = load_file(str(p))
    assert p.name == "ws.safetensors" and set(out) == set(a)
    # safetensors inputs merge in the torch-free worker, which hashed the output as it wrote it
    assert report.stats["in_process"] is False and report.stats["torch_loaded"] is False
    assert registry.hashes.get_cached(p) == sha256_file(p)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(out[k], a[k] * 0.7 + b[k] * 0.3, rtol=1e-5, atol=1e-6, msg=k)
    p = _merge(registry, settings, a="tiny-sd1", b="tiny-sd1-b", c="tiny-sd1-c", method="add_difference",
               multiplier=0.6, output_name="ad")
    out = load_file(str(p))
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(out[k], a[k] + (b[k] - c[k]) * 0.6, rtol=1e-5, atol=1e-6, msg=k)
    assert any(i.name == "ad.safetensors" for i in registry.checkpoints())  # listed at once


def test_block_weights_and_text_encoder_multiplier(registry, settings):
    a, b = _ckpt(settings, "tiny-sd1.safetensors"), _ckpt(settings, "tiny-sd1-b.safetensors")
    weights = [round(0.02 + i * 0.03, 3) for i in range(25)]
    p = _merge(registry, settings, a="tiny-sd1", b="tiny-sd1-b", multiplier=0.5, block_weights=weights,
               te_multiplier=0.9, output_name="bw")
    out = load_file(str(p))

    def check(key, m):
        torch.testing.assert_close(out[key], a[key] * (1 - m) + b[key] * m, rtol=1e-5, atol=1e-6, msg=key)

    in01 = next(k for k in a if k.startswith("model.diffusion_model.input_blocks.1."))
    check(in01, weights[BLOCK_IDS.index("IN01")])
    check(next(k for k in a if k.startswith("model.diffusion_model.middle_block.")), weights[12])
    check(next(k for k in a if k.startswith("model.diffusion_model.output_blocks.2.")), weights[15])
    check("cond_stage_model.transformer.text_model.final_layer_norm.weight", 0.9)
    check("model.diffusion_model.time_embed.0.weight", 0.5)
    check(next(k for k in a if k.startswith("first_stage_model.")), 0.5)
    # presets are 25 values; a preset name is accepted
    assert all(len(v) == 25 for v in presets().values())
    _merge(registry, settings, a="tiny-sd1", b="tiny-sd1-b", block_weights="GRAD_V", output_name="bw2")


def test_merged_files_load_and_generate(studio, settings):
    from studio.request import GenerationRequest
    reg = studio.registry
    p = merge_checkpoints(MergeSpec(a="tiny-sd1", b="tiny-sd1-diffusers", multiplier=0.5, output_name="gen"), reg,
                          settings)
    d = merge_checkpoints(MergeSpec(a="tiny-sd1", b="tiny-sd1-b", output_name="gen-folder",
                                    output_format="diffusers", fp16=True), reg, settings)
    assert (d / "model_index.json").is_file() and not list(settings.ckpt_path.glob(".*"))
    for name in (p.name, "gen-folder"):
        res = studio.generate(GenerationRequest(checkpoint=name, width=64, height=64, steps=2, prompt="x",
                                                save_images=False))
        assert res.images and res.images[0].size == (64, 64)


def test_no_interpolation_from_folder_equals_file(registry, settings):
    report = MergeReport()
    p = _merge(registry, settings, report, a="tiny-sd1-diffusers", method="no_interpolation", output_name="conv")
    assert report.stats["in_process"] is True  # a folder is loaded whole: the kernel runs on it in memory
    a, out = _ckpt(settings, "tiny-sd1.safetensors"), load_file(str(p))
    assert set(out) == set(a)
    assert all(torch.equal(out[k], a[k]) for k in a)


def test_inpainting_a_merges_first_four_channels(registry, settings):
    from tests import tinymodels
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=7, in_channels=9),
                                 settings.ckpt_path / "tiny-inpaint.safetensors")
    registry.refresh()
    a, b = _ckpt(settings, "tiny-inpaint.safetensors"), _ckpt(settings, "tiny-sd1-b.safetensors")
    out = load_file(str(_merge(registry, settings, a="tiny-inpaint", b="tiny-sd1-b", multiplier=0.25,
                               output_name="inp")))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert out[key].shape[1] == 9
    torch.testing.assert_close(out[key][:, :4], a[key][:, :4] * 0.75 + b[key] * 0.25)
    assert torch.equal(out[key][:, 4:], a[key][:, 4:])
    with pytest.raises(StudioError, match="must be model A"):
        merge_checkpoints(MergeSpec(a="tiny-sd1-b", b="tiny-inpaint", output_name="bad"), registry, settings)
    meta = json.loads(safe_open(str(settings.ckpt_path / "inp.safetensors"), "pt").metadata()["sd_merge_recipe"])
    assert meta["is_inpainting"] is True


def test_fp16_vae_bake_discard_and_metadata(registry, settings):
    vae = load_file(str(settings.vae_path / "tiny-vae.safetensors"))
    p = _merge(registry, settings, a="tiny-sd1", b="tiny-sd1-b", fp16=True, bake_vae="tiny-vae.safetensors",
               discard=r"^model\.diffusion_model\.time_embed\.", output_name="full")
    out = load_file(str(p))
    assert not any(k.startswith("model.diffusion_model.time_embed.") for k in out)
    assert all(v.dtype == torch.float16 for v in out.values() if v.is_floating_point())
    for k, v in vae.items():
        assert torch.equal(out["first_stage_model." + k], v.half().reshape(out["first_stage_model." + k].shape)), k
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    recipe, models = json.loads(meta["sd_merge_recipe"]), json.loads(meta["sd_merge_models"])
    ia, ib = registry.find_checkpoint("tiny-sd1"), registry.find_checkpoint("tiny-sd1-b")
    assert recipe["primary_model_hash"] == registry.ensure_hash(ia) and recipe["bake_in_vae"] == "tiny-vae.safetensors"
    assert recipe["interp_method"] == "Weighted sum" and recipe["save_as_half"] is True
    assert models[ia.sha256]["name"] == "tiny-sd1.safetensors" and ib.sha256 in models


def test_bad_inputs_are_refused(registry, settings):
    cases = [(dict(a="tiny-sd1", b="tiny-sd2"), "model_b"), (dict(a="nope", b="tiny-sd1-b"), "model_a"),
             (dict(a="tiny-sd1", b="tiny-sd1-b", method="add_difference"), "model_c"),
             (dict(a="tiny-sd1", b="tiny-sd1-b", discard="(["), "discard"),
             (dict(a="tiny-sd1", b="tiny-sd1-b", output_name="tiny-sd1-b"), "output_name"),
             (dict(a="tiny-sd1", b="tiny-sd1-b", output_name="../x"), "output_name"),
             (dict(a="tiny-sd1", b="tiny-sd1-b", block_weights=[1, 2]), "block_weights")]
    for kw, field in cases:
        with pytest.raises(StudioError) as e:
            merge_checkpoints(MergeSpec(**kw), registry, settings)
        assert e.value.field == field, (kw, e.value)
        if field == "model_b":
            assert "SD 1.x" in str(e.value) and "SD 2.x" in str(e.value)
    assert not [p for p in settings.ckpt_path.iterdir() if p.name.startswith(".")]  # no temp files left


# ---- LoRA ----------------------------------------------------------------------------------------------------------
def _module(comps, attr, path):
    m = getattr(comps, attr)
    return m.get_submodule(path if attr == "unet" else "text_model." + path) if attr != "unet" and \
        hasattr(m, "text_model") else m.get_submodule(path)


def _write_lora(settings, name, builder, c, **kw):
    from tests import lorafiles
    sd, exp = lorafiles.BUILDERS[builder](c, **kw)
    lorafiles.write(settings.lora_path / f"{name}.safetensors", sd, lorafiles.metadata_for(c))
    return exp


@pytest.mark.parametrize("family,ckpt,seed,builder", [("sd1", "tiny-sd1", 0, "kohya"), ("sd2", "tiny-sd2", 3, "loha"),
                                                      ("sdxl", "tiny-sdxl", 4, "kohya")])
def test_bake_lora_equals_w_plus_delta(registry, settings, family, ckpt, seed, builder):
    from studio.loading.single_file import load_single_file
    from studio.merge import bake_loras
    from tests import tinymodels
    c = tinymodels.make_tiny(family, seed=seed)
    exp = _write_lora(settings, "lo", builder, c)
    p = bake_loras(registry, settings, ckpt, [("lo", 0.5, 0.7)], "baked")
    baked = load_single_file(p)
    assert exp
    for (attr, path), delta in exp.items():
        w = 0.7 if attr == "unet" else 0.5
        orig, new = _module(c, attr, path).weight, _module(baked, attr, path).weight
        torch.testing.assert_close(new, orig + w * delta.reshape(orig.shape), rtol=1e-4, atol=1e-5,
                                   msg=f"{attr} {path}")


def _deltas(path):
    from studio.adapters.lora_files import load_lora_file
    lf = load_lora_file(path)
    return {k: d.weight_delta(torch.zeros(d.shape())) for k, d in lf.layers.items()}


def test_concat_merge_is_exact_and_svd_full_rank_reconstructs(settings):
    from studio.merge import merge_loras, resize_lora
    from tests import tinymodels
    c = tinymodels.make_tiny("sd1", seed=0)
    _write_lora(settings, "one", "kohya", c, seed=1)
    _write_lora(settings, "two", "loha", c, seed=2)
    d1, d2 = _deltas(settings.lora_path / "one.safetensors"), _deltas(settings.lora_path / "two.safetensors")
    res = merge_loras(settings, [("one", 0.5), ("two", -0.3)], "cat", mode="concat", fp16=False)
    merged = _deltas(res.path)
    assert set(merged) == set(d1) | set(d2)
    for k, d in merged.items():
        want = 0.5 * d1.get(k, 0) - 0.3 * d2.get(k, torch.zeros_like(d)).reshape(d.shape)
        torch.testing.assert_close(d, want.reshape(d.shape), rtol=1e-4, atol=1e-5, msg=str(k))
    meta = safe_open(str(res.path), "pt").metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    from studio.hashes import addnet_hash_raw
    assert meta["sshs_model_hash"] == addnet_hash_raw(res.path)
    res = merge_loras(settings, [("one", 0.5), ("two", -0.3)], "svd", mode="svd", rank=4096, conv_rank=4096, fp16=False)
    for k, d in _deltas(res.path).items():
        torch.testing.assert_close(d, merged[k], rtol=1e-3, atol=1e-5, msg=str(k))
    assert res.energy == pytest.approx(1.0)
    # resize: full rank keeps everything; rank 1 keeps less, reported per layer
    full = resize_lora(settings, "one", "one-full", rank=4, fp16=False)
    for k, d in _deltas(full.path).items():
        torch.testing.assert_close(d, d1[k], rtol=1e-3, atol=1e-5)
    small = resize_lora(settings, "one", "one-r1", rank=1, conv_rank=1)
    assert 0 < small.energy < 1 and all(s.new_rank == 1 and s.old_rank == 4 for s in small.layers.values())
    fro = resize_lora(settings, "one", "one-fro", method="sv_fro", param=0.9, rank=4)
    assert all(s.energy >= 0.81 - 1e-4 for s in fro.layers.values())


def test_extract_then_bake_approximates_tuned(registry, settings):
    from studio.merge import bake_loras, extract_lora
    from studio.merge.lora_keys import checkpoint_layers
    res = extract_lora(registry, settings, "tiny-sd1-b", "tiny-sd1", "ex", rank=4096, conv_rank=4096,
                       clamp_quantile=None, fp16=False)
    assert res.energy == pytest.approx(1.0) and any("lora_te_text_model_" in k for k in res.layers)
    p = bake_loras(registry, settings, "tiny-sd1", [("ex", 1.0)], "rebuilt")
    tuned, base, out = (_ckpt(settings, n) for n in ("tiny-sd1-b.safetensors", "tiny-sd1.safetensors", p.name))
    keys = {lt.key for lt in checkpoint_layers({k: v.shape for k, v in base.items()}, "sd1")
            if lt.is_default_target(True)}
    assert len(keys) > 20
    for k in keys:
        err = (out[k] - tuned[k]).norm() / (tuned[k] - base[k]).norm()
        assert err < 1e-3, k
    low = extract_lora(registry, settings, "tiny-sd1-b", "tiny-sd1", "ex-low", rank=2, conv_rank=0)
    assert 0 < low.energy < 1
    assert not any(v.new_rank > 2 for v in low.layers.values())


def test_baked_lora_image_equals_activated_lora(studio, settings):
    import numpy as np

    from studio.merge import bake_loras
    from studio.request import GenerationRequest
    from tests import tinymodels
    _write_lora(settings, "lo", "kohya", tinymodels.make_tiny("sd1", seed=0))
    studio.loras.refresh()
    bake_loras(studio.registry, settings, "tiny-sd1", [("lo", 0.8)], "baked-lo")
    base = dict(width=64, height=64, steps=2, seed=5, sampler_name="Euler", save_images=False)
    live = studio.generate(GenerationRequest(checkpoint="tiny-sd1", prompt="a cube <lora:lo:0.8>", **base))
    baked = studio.generate(GenerationRequest(checkpoint="baked-lo", prompt="a cube", **base))
    plain = studio.generate(GenerationRequest(checkpoint="tiny-sd1", prompt="a cube", **base))
    assert not live.warnings
    px = [np.asarray(r.images[0], dtype=np.int16) for r in (live, baked, plain)]
    assert np.abs(px[0] - px[1]).max() <= 1
    assert np.abs(px[0] - px[2]).max() > 1  # the LoRA does change the image
