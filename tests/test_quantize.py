"""Weight quantisation (setting ``quantize``): int8 weight-only linear layers through torchao, applied per model by
the PipelineManager; the budget counts the real bytes; LoRAs on an int8 model; the setting keys the cache."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from studio import quantize
from studio.adapters import AdapterPatcher, load_lora_file
from studio.request import GenerationRequest
from tests import lorafiles as lf
from tests.tinymodels import make_tiny

CPU = torch.device("cpu")
BASE = dict(width=64, height=64, steps=3, seed=5, save_images=False, sampler_name="Euler", prompt="a cube")


def px(img):
    return np.asarray(img, dtype=np.float32)


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x.to(unet.dtype), torch.tensor([700, 300]), encoder_hidden_states=text.to(unet.dtype)).sample


def quantised_linears(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear) and quantize.is_quantised(m.weight)]


def storage_bytes(module) -> int:
    """Bytes of the storages that really hold the values: int8 data, fp32 scales and int8 zero points (torchao
    keeps zeros even for symmetric int8) of quantised weights."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if quantize.is_quantised(t):
            total += sum(x.untyped_storage().nbytes() for x in (t.qdata, t.scale, t.zero_point) if x is not None)
        else:
            total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_unet_is_close_and_counted_at_its_real_size(dtype):
    c = make_tiny("sd1", seed=0)
    for m in c.modules().values():
        m.to(dtype)
    ref = copy.deepcopy(c)
    notes = quantize.apply(c, "int8", CPU, dtype)
    assert "int8 weight-only" in notes[0] and "unet" in notes[0] and "text_encoder" in notes[0]
    linears = [m for m in c.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and quantised_linears(c.unet) == linears        # every linear layer of the UNet
    assert quantised_linears(c.text_encoder)
    # convolutions (torchao has no int8 conv), norms, embeddings and the VAE keep their float weights
    assert all(not quantize.is_quantised(p) for p in c.vae.parameters())
    assert all(m.weight.dtype == dtype and not quantize.is_quantised(m.weight)
               for m in c.unet.modules() if isinstance(m, torch.nn.Conv2d))
    # the counted size is the real one: int8 data + scales, not the float size the wrapper reports
    assert c.nbytes() == sum(storage_bytes(m) for m in c.modules().values())
    lin_float = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    lin_real = sum(quantize.tensor_bytes(m.weight) for m in linears)
    want = {torch.float32: 0.25, torch.bfloat16: 0.5}[dtype]
    assert want <= lin_real / lin_float <= want * 1.15, (lin_real, lin_float)   # + one fp32 scale per row
    te_saved = sum(m.weight.numel() * m.weight.element_size() - quantize.tensor_bytes(m.weight)
                   for m in quantised_linears(c.text_encoder))
    assert ref.nbytes() - c.nbytes() == lin_float - lin_real + te_saved
    # the output stays close to the float model's (int8 per row: ~0.4 % of each row's largest weight)
    a, b = unet_out(ref.unet).float(), unet_out(c.unet).float()
    assert not torch.equal(a, b)
    tol = {torch.float32: 0.01, torch.bfloat16: 0.03}[dtype]
    assert (a - b).abs().max() <= tol * a.abs().max(), ((a - b).abs().max(), a.abs().max())


def test_weights_a_file_keeps_quantised_are_not_quantised_again():
    c = make_tiny("sd1", seed=0)
    fp8 = c.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    fp8.weight.data = fp8.weight.data.to(torch.float8_e4m3fn)   # as an fp8 file's layerwise-cast layer holds it
    notes = quantize.apply(c, "int8", CPU, torch.float32)
    assert fp8.weight.dtype == torch.float8_e4m3fn and not quantize.is_quantised(fp8.weight)
    assert "1 linear layers already quantised in the file were left as stored" in notes[0]
    again = quantize.apply(c, "int8", CPU, torch.float32)          # a quantised model: nothing left to do
    assert "no float linear layers" in again[0]


def test_fp8_needs_cuda_and_stores_fp8_where_applied():
    c = make_tiny("sd1", seed=0)
    ref = unet_out(c.unet)
    notes = quantize.apply(c, "fp8", CPU, torch.float32)
    assert "needs a CUDA device" in notes[0] and "--quantize int8" in notes[0]
    assert quantize.effective("fp8", CPU) == "none" and quantize.effective("fp8", torch.device("cuda")) == "fp8"
    assert torch.equal(unet_out(c.unet), ref)                     # nothing was changed
    # what CUDA gets (diffusers' layerwise casting also runs on the CPU, so it can be checked here)
    assert quantize._fp8(c.unet, torch.float32)
    held = [p.dtype for p in c.unet.parameters() if p.ndim >= 2]
    assert held.count(torch.float8_e4m3fn) > len(held) // 2
    out = unet_out(c.unet)
    assert 0 < (out - ref).abs().mean() <= 0.1 * ref.abs().mean()     # e4m3 keeps 3 mantissa bits


def test_lora_on_int8_is_the_int8_values_plus_the_lora_requantised_and_restores_exactly(tmp_path):
    c = make_tiny("sd1", seed=0)
    tensors, expected = lf.kohya_lora(c, seed=3, te=False)
    lora = load_lora_file(lf.write(tmp_path / "x.safetensors", tensors, lf.metadata_for(c)))
    floats = copy.deepcopy(c)            # the float model with the LoRA merged in
    with torch.no_grad():
        for (attr, path), delta in expected.items():
            floats.unet.get_submodule(path).weight += 0.8 * delta
    quantize.apply(c, "int8", CPU, torch.float32)
    snap = {n: (p.qdata.clone(), p.scale.clone()) if quantize.is_quantised(p) else p.detach().clone()
            for n, p in c.unet.named_parameters()}
    # the reference: the LoRA added to the int8 model's values (its float originals are gone), quantised again
    merged = copy.deepcopy(c)
    with torch.no_grad():
        for (attr, path), delta in expected.items():
            layer = merged.unet.get_submodule(path)
            w = quantize.dequantised(layer.weight) + 0.8 * delta
            layer.weight = torch.nn.Parameter(quantize.like(layer.weight, w), requires_grad=False)
    p = AdapterPatcher(c, cache_bytes=64 << 20)
    assert p.apply([(lora, 0.8, 0.8)]) == []
    for (attr, path), _ in expected.items():
        got, want = c.unet.get_submodule(path).weight, merged.unet.get_submodule(path).weight
        assert quantize.is_quantised(got) == quantize.is_quantised(want)
        torch.testing.assert_close(quantize.dequantised(got), quantize.dequantised(want), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unet_out(c.unet), unet_out(merged.unet), atol=1e-5, rtol=1e-4)
    a, b = unet_out(floats.unet), unet_out(c.unet)                 # as close to the float LoRA as int8 without one
    assert (a - b).abs().max() <= 0.01 * a.abs().max(), ((a - b).abs().max(), a.abs().max())
    assert p.originals_bytes <= 0.4 * sum(m.weight.numel() * 4 for m in quantised_linears(c.unet)) + sum(
        c.unet.get_submodule(path).weight.numel() * 4 for (_, path) in expected
        if not quantize.is_quantised(c.unet.get_submodule(path).weight))   # originals kept as int8 too

    def same_as_loaded():
        for n, q in c.unet.named_parameters():
            if quantize.is_quantised(q):
                assert torch.equal(q.qdata, snap[n][0]) and torch.equal(q.scale, snap[n][1]), n
            else:
                assert torch.equal(q, snap[n]), n

    p.apply([])
    same_as_loaded()
    n = p.patch_count
    p.apply([(lora, 0.8, 0.8)])                          # from the patched-set cache: a copy, not a recompute
    assert p.patch_count == n
    torch.testing.assert_close(unet_out(c.unet), unet_out(merged.unet), atol=1e-5, rtol=1e-4)
    p.release()
    same_as_loaded()


@pytest.fixture()
def lora_dir(models_dir):
    sd, _ = lf.kohya_lora(make_tiny("sd1", seed=0), seed=1, rank=4)
    lf.write(models_dir / "Lora" / "style.safetensors", sd, lf.metadata_for(make_tiny("sd1", seed=0)))
    return models_dir


def test_studio_int8_draws_close_reloads_on_change_and_counts_the_real_size(studio, lora_dir):
    m = studio.manager
    plain = studio.generate(GenerationRequest(**BASE))
    styled = studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube <lora:style:1>"}))
    loads = m.loads
    studio.settings.quantize = "int8"          # what the Settings tab does: the next acquire loads an int8 copy
    q = studio.generate(GenerationRequest(**BASE))
    assert m.loads == loads + 1
    q_styled = studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube <lora:style:1>"}))
    assert not q.warnings and not q_styled.warnings
    for a, b in ((plain, q), (styled, q_styled)):
        diff = np.abs(px(a.images[0]) - px(b.images[0]))
        assert 0 < diff.mean() < 2.0, diff.mean()         # 0-255 pixels; tiny random models amplify errors
    assert np.abs(px(q.images[0]) - px(q_styled.images[0])).mean() > 1.0   # the LoRA still changes the picture
    entries = {e.key[-1]: e for e in m._entries.values()}
    assert set(entries) == {"none", "int8"}
    comps = entries["int8"].value
    assert quantised_linears(comps.unet)
    assert entries["int8"].nbytes == comps.nbytes() == sum(storage_bytes(x) for x in comps.modules().values())
    assert entries["int8"].nbytes < entries["none"].nbytes
    assert any("int8 weight-only" in n for n in comps.notes)
    # back to float: the float copy is still cached, nothing is read again
    studio.settings.quantize = "none"
    again = studio.generate(GenerationRequest(**BASE))
    assert m.loads == loads + 1 and np.array_equal(px(again.images[0]), px(plain.images[0]))


def test_fp8_on_the_cpu_and_int8_under_lowvram_keep_the_float_model(settings):
    from studio.app import Studio
    for quant, offload, needle in (("fp8", "none", "needs a CUDA device"), ("int8", "lowvram", "--lowvram")):
        s = Studio(settings.replace(quantize=quant, offload=offload))
        s.manager.offload_on_cpu = offload != "none"
        try:
            s.generate(GenerationRequest(**BASE))
            (entry,) = s.manager._entries.values()
            assert not quantised_linears(entry.value.unet)
            assert any(needle in n for n in entry.value.notes), entry.value.notes
            if quant == "fp8":
                assert entry.key[-1] == "none"   # the same copy as without the setting
        finally:
            s.close()


def test_flag_and_setting():
    from studio import cli
    from studio.errors import StudioError
    from studio.settings import Settings

    args = cli.build_parser().parse_args(["--quantize", "int8"])
    assert cli.settings_overrides(args)["quantize"] == "int8"
    assert Settings.from_dict({"quantize": "fp8"})[0].validate().quantize == "fp8"
    with pytest.raises(StudioError, match="quantize"):
        Settings(quantize="int4").validate()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--quantize", "int4"])
