"""LoRA / LyCORIS patching, the LoRA library and embeddings, on the tiny models with files written here."""
from __future__ import annotations

import json
import random

import pytest
import torch

from studio.adapters import AdapterPatcher, EmbeddingLibrary, LoraLibrary, load_lora_file
from studio.hashes import HashCache, addnet_hash_raw, sha256_file
from tests import lorafiles as lf
from tests.tinymodels import make_tiny


@pytest.fixture(scope="module")
def sd1():
    return make_tiny("sd1", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return make_tiny("sdxl", seed=4)


def _snapshot(c):
    return {f"{attr}.{k}": v.detach().clone() for attr, mod in c.modules().items() if attr != "vae"
            for k, v in mod.state_dict().items()}


def _assert_same(c, snap):
    now = _snapshot(c)
    bad = [k for k, v in snap.items() if not torch.equal(v, now[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def _module(c, attr, path):
    mod = getattr(c, attr)
    if attr == "text_encoder_2":
        mod = mod.text_model
    return mod.get_submodule(path)


def _check_deltas(c, snap, expected, weight):
    for key, delta in expected.items():
        attr, path = key[:2]
        part = key[2] if len(key) > 2 else "weight"
        prefix = "text_model." if attr == "text_encoder_2" else ""
        orig = snap[f"{attr}.{prefix}{path}.{part}"]
        now = getattr(_module(c, attr, path), part).detach()
        torch.testing.assert_close(now, orig + weight * delta, atol=2e-6, rtol=1e-5, msg=f"{key}")


# ---- formats: patched weight == W + weight * ΔW --------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", sorted(lf.BUILDERS))
def test_patch_equals_formula(tmp_path, family, fmt, sd1, sdxl):
    c = sd1 if family == "sd1" else sdxl
    tensors, expected = lf.BUILDERS[fmt](c, seed=11)
    path = lf.write(tmp_path / f"{fmt}.safetensors", tensors, lf.metadata_for(c))
    lora = load_lora_file(path)
    assert not lora.unknown_keys and len(lora.layers) == len({k[:2] for k in expected})
    assert lora.family == family
    snap = _snapshot(c)
    p = AdapterPatcher(c)
    try:
        warnings = p.apply([(lora, 0.7, 0.7)])
        assert warnings == []
        _check_deltas(c, snap, expected, 0.7)
    finally:
        p.restore()
    _assert_same(c, snap)


def test_kinds_and_alpha_default(tmp_path, sd1):
    cases = {"kohya": "locon", "locon_tucker": "locon", "loha": "loha", "lokr": "lokr", "full": "full",
             "diffusers": "diffusers"}
    for fmt, kind in cases.items():
        tensors, _ = lf.BUILDERS[fmt](sd1, seed=1)
        assert load_lora_file(lf.write(tmp_path / f"{fmt}.safetensors", tensors)).kind == kind, fmt
    tensors, _ = lf.kohya_lora(sd1, seed=1, conv=False)
    assert load_lora_file(lf.write(tmp_path / "plain.safetensors", tensors)).kind == "lora"
    # alpha missing means alpha = rank; the old diffusers naming and a weights-only .pt file load too
    for name, (tensors, expected) in {"noalpha.safetensors": lf.kohya_lora(sd1, seed=2, alpha=None),
                                      "old.safetensors": lf.diffusers_lora(sd1, seed=3, style="old"),
                                      "fp16.pt": lf.kohya_lora(sd1, seed=4, dtype=torch.float16)}.items():
        lora = load_lora_file(lf.write(tmp_path / name, tensors))
        assert not lora.unknown_keys, name
        snap = _snapshot(sd1)
        p = AdapterPatcher(sd1)
        assert p.apply([(lora, 1.0, 1.0)]) == []
        _check_deltas(sd1, snap, expected, 1.0)
        p.restore()
        _assert_same(sd1, snap)


def test_negative_weight_and_te_unet_split(tmp_path, sd1):
    tensors, expected = lf.kohya_lora(sd1, seed=5)
    lora = load_lora_file(lf.write(tmp_path / "x.safetensors", tensors))
    snap = _snapshot(sd1)
    p = AdapterPatcher(sd1)
    p.apply([(lora, 0.0, -0.8)])      # unet only, negative
    unet_exp = {k: v for k, v in expected.items() if k[0] == "unet"}
    _check_deltas(sd1, snap, unet_exp, -0.8)
    te_now = {k: v for k, v in _snapshot(sd1).items() if k.startswith("text_encoder.")}
    assert all(torch.equal(v, snap[k]) for k, v in te_now.items())
    p.apply([(lora, 1.5, 0.0)])       # text encoder only
    _check_deltas(sd1, snap, {k: v for k, v in expected.items() if k[0] != "unet"}, 1.5)
    assert all(torch.equal(v, snap[k]) for k, v in _snapshot(sd1).items() if k.startswith("unet."))
    p.apply([(lora, 0.5, 1.0)])
    _check_deltas(sd1, snap, unet_exp, 1.0)
    p.restore()
    _assert_same(sd1, snap)


def test_same_set_costs_nothing_and_weight_zero_is_noop(tmp_path, sd1):
    lora = load_lora_file(lf.write(tmp_path / "x.safetensors", lf.kohya_lora(sd1, seed=6)[0]))
    snap = _snapshot(sd1)
    p = AdapterPatcher(sd1)
    p.apply([(lora, 0.0, 0.0)])
    assert p.key == () and p.patched_params == 0
    _assert_same(sd1, snap)
    p.apply([(lora, 1.0, 1.0)])
    patched = _snapshot(sd1)
    n = p.patch_count
    p.apply([(lora, 1.0, 1.0)])
    assert p.patch_count == n
    # back to a recent set: copied from the patched-set cache, identical to computing it
    p.apply([(lora, 0.5, 0.5)])
    p.apply([])
    _assert_same(sd1, snap)
    p.apply([(lora, 1.0, 1.0)])
    assert p.patch_count == n + 1
    _assert_same(sd1, patched)
    p.release()
    _assert_same(sd1, snap)


@pytest.mark.parametrize("cache_bytes", [0, 64 << 20])
def test_restore_bit_exact_after_100_mixed_cycles(tmp_path, sd1, cache_bytes):
    files = [load_lora_file(lf.write(tmp_path / f"{fmt}.safetensors", lf.BUILDERS[fmt](sd1, seed=i)[0]))
             for i, fmt in enumerate(sorted(lf.BUILDERS))]
    snap = _snapshot(sd1)
    p = AdapterPatcher(sd1, cache_bytes=cache_bytes)
    rng = random.Random(0)
    for _ in range(100):
        chosen = rng.sample(files[:3], rng.randint(0, 2)) + rng.sample(files[3:], rng.randint(0, 3))
        p.apply([(f, rng.choice([-1.0, 0.0, 0.5, 1.7]), rng.choice([-0.5, 0.0, 1.0])) for f in chosen])
        if rng.random() < 0.3:
            p.restore()
    p.apply([])
    _assert_same(sd1, snap)


# ---- wrong family, unknown keys -------------------------------------------------------------------------------
def test_sdxl_lora_on_sd1_is_skipped(tmp_path, sd1, sdxl):
    tensors, _ = lf.kohya_lora(sdxl, seed=7)
    with_meta = load_lora_file(lf.write(tmp_path / "xl.safetensors", tensors, lf.metadata_for(sdxl)))
    no_meta = load_lora_file(lf.write(tmp_path / "xl-nometa.safetensors", tensors))
    assert no_meta.family == "sdxl"    # lora_te2_ keys name SDXL even without metadata
    snap = _snapshot(sd1)
    p = AdapterPatcher(sd1)
    for lora in (with_meta, no_meta):
        warnings = p.apply([(lora, 1.0, 1.0)])
        assert warnings == [f"LoRA '{lora.name}' is for SDXL; the loaded checkpoint is SD1 – skipped."]
        _assert_same(sd1, snap)
    # a file nothing identifies, whose layers do not exist here, is skipped by the fit rule
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_input_blocks_3_1")}
    stray = load_lora_file(lf.write(tmp_path / "stray.safetensors", unet_only))
    assert stray.family is None
    [w] = p.apply([(stray, 1.0, 1.0)])
    assert "'stray'" in w and "does not fit" in w and "skipped" in w
    _assert_same(sd1, snap)


def test_unknown_keys_reported_not_fatal(tmp_path, sd1):
    tensors, expected = lf.kohya_lora(sd1, seed=8, conv=False)
    tensors["lora_unet_conv_in.lora_down.weight"] = torch.zeros(4, 4, 3, 3)   # no lora_up: incomplete
    tensors["some_other_network.weight"] = torch.zeros(3)
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 8)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 2)
    lora = load_lora_file(lf.write(tmp_path / "odd.safetensors", tensors))
    assert lora.unknown_keys == ["lora_unet_conv_in.lora_down.weight", "some_other_network.weight"]
    snap = _snapshot(sd1)
    p = AdapterPatcher(sd1)
    warnings = p.apply([(lora, 1.0, 1.0)])
    assert any("1 layers not in this model" in w for w in warnings)
    assert any("2 keys not understood" in w for w in warnings)
    _check_deltas(sd1, snap, expected, 1.0)
    p.restore()


# ---- library ----------------------------------------------------------------------------------------------------
def _library_files(settings, c):
    lora_dir, lyco_dir = settings.lora_path, settings.lycoris_path
    freq = {"10_castle": {"castle": 12, "tower": 3, "sky": 5}, "5_extra": {"tower": 10}}
    lf.write(lora_dir / "castle.safetensors", lf.kohya_lora(c, seed=1)[0],
             lf.metadata_for(c, ss_output_name="castle_v2", ss_tag_frequency=freq))
    (lora_dir / "castle.preview.png").write_bytes(b"png")
    lf.write(lora_dir / "styles" / "ink.safetensors", lf.loha(c, seed=2)[0],
             {"modelspec.trigger_phrase": "ink style", "modelspec.architecture": "stable-diffusion-v1/lora"})
    (lora_dir / "styles" / "ink.jpg").write_bytes(b"jpg")
    lf.write(lora_dir / "old.pt", lf.kohya_lora(c, seed=3, conv=False)[0])
    lf.write(lyco_dir / "deep" / "kron.safetensors", lf.lokr(c, seed=4)[0])


def test_library_scan(settings, sd1):
    _library_files(settings, sd1)
    lib = LoraLibrary(settings, HashCache(None))
    by_name = {e.name: e for e in lib.entries()}
    assert set(by_name) == {"castle", "ink", "old", "kron"}
    castle, ink = by_name["castle"], by_name["ink"]
    assert castle.alias == "castle_v2" and castle.preview.name == "castle.preview.png"
    assert castle.trigger_words[:3] == ["tower", "castle", "sky"]
    assert castle.family == "sd1" and ink.family == "sd1" and by_name["kron"].family is None
    assert ink.trigger_words == ["ink style"] and ink.preview.name == "ink.jpg" and ink.folder == "styles"
    assert by_name["kron"].folder == "deep"
    assert lib.find("castle_v2") is castle and lib.find("styles/ink") is ink and lib.find("CASTLE") is castle
    api = lib.list()
    assert {"name", "alias", "path", "metadata"} == set(api[0])
    assert lib.hash("castle") == addnet_hash_raw(castle.path)[:12]
    assert lib.hash("old") == sha256_file(by_name["old"].path)[:12]
    assert LoraLibrary.infotext_hashes([("castle", "0123456789ab"), ("a:b,c", "ba9876543210")]) == \
        "castle: 0123456789ab, abc: ba9876543210"
    lf.write(settings.lora_path / "new.safetensors", lf.kohya_lora(sd1, seed=9)[0])
    assert lib.find("new") is None
    lib.refresh()
    assert lib.find("new") is not None


def test_reactivating_cached_set_reads_nothing(settings, sd1):
    _library_files(settings, sd1)
    lib = LoraLibrary(settings, HashCache(None))
    snap = _snapshot(sd1)
    p = AdapterPatcher(sd1)
    tags = [("castle", 1.0, 1.0), ("ink", -0.5, -0.5), ("kron", 0.3, 0.6), ("missing", 1.0, 1.0)]
    active, warnings = lib.resolve(tags)
    assert warnings == ["Networks not found: missing"] and lib.reads == 3
    p.apply(active)
    p.apply([])
    reads = lib.reads
    for _ in range(3):
        active, _ = lib.resolve(tags)
        p.apply(active)
        p.apply(lib.resolve(tags[:1])[0])
    assert lib.reads == reads
    p.restore()
    _assert_same(sd1, snap)


def test_parsed_cache_respects_budget(settings, sd1):
    _library_files(settings, sd1)
    lib = LoraLibrary(settings, HashCache(None), cache_bytes=1)   # room for one file only
    lib.load("castle")
    lib.load("ink")
    assert lib.reads == 2
    lib.load("ink")
    assert lib.reads == 2
    lib.load("castle")
    assert lib.reads == 3


# ---- embeddings -------------------------------------------------------------------------------------------------
def _embedding_files(settings):
    d = settings.embeddings_path
    g = torch.Generator().manual_seed(0)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_param": {"*": torch.randn(3, 32, generator=g)}, "name": "a1111", "step": 500,
                "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny", "string_to_token": {"*": 265}},
               str(d / "a1111pt.pt"))
    lf.write(d / "sub" / "embparams.safetensors", {"emb_params": torch.randn(2, 32, generator=g)})
    lf.write(d / "diffusers.safetensors", {"<cat-toy>": torch.randn(32, generator=g)})
    lf.write(d / "xl.safetensors", {"clip_l": torch.randn(2, 32, generator=g),
                                    "clip_g": torch.randn(2, 32, generator=g)})
    lf.write(d / "wide.safetensors", {"emb_params": torch.randn(1, 768, generator=g)})
    (d / "broken.pt").write_bytes(b"not a pickle")


def test_embeddings_fit_and_skip(settings, sd1, sdxl):
    _embedding_files(settings)
    lib = EmbeddingLibrary(settings, HashCache(None))
    loaded, skipped = lib.for_model(sd1)
    assert set(loaded) == {"a1111pt", "embparams", "diffusers"}
    assert loaded["a1111pt"].n_vectors == 3 and loaded["diffusers"].n_vectors == 1
    assert set(loaded["embparams"].vectors) == {"text_encoder"}
    assert loaded["embparams"].vectors["text_encoder"].shape == (2, 32)
    assert "SDXL embedding" in skipped["xl"] and "is SD1" in skipped["xl"]
    assert "width 768" in skipped["wide"] and "broken" in skipped
    loaded_xl, skipped_xl = lib.for_model(sdxl)
    assert set(loaded_xl) == {"xl"}
    assert set(loaded_xl["xl"].vectors) == {"text_encoder", "text_encoder_2"}
    assert "clip_l and clip_g" in skipped_xl["embparams"]
    api = lib.api_dict(sd1)
    assert api["loaded"]["a1111pt"] == {"step": 500, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny",
                                        "shape": 32, "vectors": 3}
    assert api["skipped"]["xl"]["vectors"] == 2
    assert lib.hash("a1111pt") == sha256_file(settings.embeddings_path / "a1111pt.pt")[:12]
    reads = lib.reads
    lib.for_model(sd1)
    assert lib.reads == reads
    json.dumps(api)


def test_sd2_lora_last_text_layer_is_silently_unused(tmp_path):
    c = make_tiny("sd2", seed=3)
    tensors, expected = lf.kohya_lora(c, seed=12)
    n = c.text_encoder.config.num_hidden_layers   # OpenCLIP's last block, which diffusers' SD2 drops
    stem = f"lora_te_text_model_encoder_layers_{n}_mlp_fc1"
    tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"] = torch.ones(4, 32), torch.ones(37, 4)
    lora = load_lora_file(lf.write(tmp_path / "sd2.safetensors", tensors, lf.metadata_for(c)))
    assert lora.family == "sd2"
    snap = _snapshot(c)
    p = AdapterPatcher(c)
    assert p.apply([(lora, 1.0, 1.0)]) == []
    _check_deltas(c, snap, expected, 1.0)
    p.restore()
    _assert_same(c, snap)


def test_text_encoder_part_changes_conditioning(tmp_path, sd1):
    lora = load_lora_file(lf.write(tmp_path / "x.safetensors", lf.kohya_lora(sd1, seed=13)[0]))
    ids = sd1.tokenizer("a castle", padding="max_length", max_length=77, return_tensors="pt").input_ids

    def encode():
        with torch.no_grad():
            return sd1.text_encoder(ids)[0]
    base = encode()
    p = AdapterPatcher(sd1)
    p.apply([(lora, 0.0, 1.0)])
    assert torch.equal(encode(), base) and p.te_key == ()
    p.apply([(lora, 1.0, 1.0)])
    assert not torch.allclose(encode(), base) and p.te_key == ((lora.ident, 1.0),)
    p.restore()
    assert torch.equal(encode(), base)


def test_patcher_for_is_one_per_components(sd1, sdxl):
    from studio.adapters import patcher_for
    assert patcher_for(sd1) is patcher_for(sd1) and patcher_for(sd1) is not patcher_for(sdxl)
