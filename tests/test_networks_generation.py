"""LoRAs and embeddings at generation time: prompt tags, warnings, infotext hashes, exact restore."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.infotext import parse_infotext
from studio.request import GenerationRequest
from tests import lorafiles
from tests.tinymodels import make_tiny

BASE = dict(width=64, height=64, steps=3, seed=5, save_images=False, sampler_name="Euler", prompt="a cube")


def px(img):
    return np.asarray(img, dtype=np.int16)


@pytest.fixture()
def with_networks(models_dir):
    """Write LoRAs for the tiny SD1 (same weights as tiny-sd1.safetensors: seed 0) and an SDXL one."""
    sd1 = make_tiny("sd1", seed=0)
    lora = models_dir / "Lora"
    for i, name in enumerate(("style", "castle", "extra1", "extra2", "extra3")):
        sd, _ = lorafiles.kohya_lora(sd1, seed=i, rank=4)
        lorafiles.write(lora / ("sub" if name == "castle" else "") / f"{name}.safetensors", sd,
                        lorafiles.metadata_for(sd1, ss_tag_frequency={"img": {"castle": 3, "stone": 1}}))
    sd, _ = lorafiles.loha(sd1, seed=9)
    lorafiles.write(models_dir / "LyCORIS" / "hada.safetensors", sd, lorafiles.metadata_for(sd1))
    xl = make_tiny("sdxl", seed=4)
    sd, _ = lorafiles.kohya_lora(xl, seed=1, rank=2)
    lorafiles.write(lora / "xl-only.safetensors", sd, lorafiles.metadata_for(xl))
    emb = models_dir / "embeddings"
    emb.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "shiny", "step": 10}, emb / "shiny.pt")
    return models_dir


@pytest.fixture()
def net_studio(settings, with_networks):
    from studio.app import Studio
    s = Studio(settings)
    yield s
    s.close()


def test_lora_zero_weight_equals_no_lora_and_weights_are_restored(net_studio):
    plain = net_studio.generate(GenerationRequest(**BASE))
    zero = net_studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube <lora:style:0>"}))
    assert np.array_equal(px(plain.images[0]), px(zero.images[0]))
    styled = net_studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube <lora:style:1>"}))
    assert not np.array_equal(px(plain.images[0]), px(styled.images[0]))
    assert 'Lora hashes: "style: ' in styled.infotexts[0]
    again = net_studio.generate(GenerationRequest(**BASE))
    assert np.array_equal(px(plain.images[0]), px(again.images[0]))  # base model exactly as it was


def test_five_loras_with_negative_weights_and_lycoris(net_studio):
    prompt = ("a cube <lora:style:0.8> <lora:castle:-0.5> <lora:extra1:0.3:1> <lora:extra2:1> "
              "<lora:extra3:-1> <lora:hada:0.7>")
    res = net_studio.generate(GenerationRequest(**{**BASE, "prompt": prompt}))
    text = res.infotexts[0]
    for name in ("style", "castle", "extra1", "extra2", "extra3", "hada"):
        assert f"{name}: " in text.split("Lora hashes:")[1]
    assert not res.warnings, res.warnings
    parsed = parse_infotext(text)
    assert "<lora:castle:-0.5>" in parsed["Prompt"]  # reading the infotext back restores the tags


def test_wrong_family_lora_is_skipped_with_a_warning(net_studio):
    plain = net_studio.generate(GenerationRequest(**BASE))
    res = net_studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube <lora:xl-only:1>"}))
    assert any("xl-only" in w and "SDXL" in w for w in res.warnings)
    assert np.array_equal(px(plain.images[0]), px(res.images[0]))


def test_unknown_lora_is_named(net_studio):
    res = net_studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube <lora:nope:1>"}))
    assert any("nope" in w for w in res.warnings) and len(res.images) == 1


def test_embedding_changes_only_its_token_and_is_hashed(net_studio):
    plain = net_studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube, shinything"}))
    shiny = net_studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube, shiny"}))
    assert "TI hashes" in shiny.infotexts[0] and "shiny: " in shiny.infotexts[0]
    assert "TI hashes" not in plain.infotexts[0]
    with net_studio.manager.acquire() as loaded:
        fitted = net_studio.embeddings.for_model(loaded.components)[0]
        enc = net_studio.prompts
        with_emb = enc.encode(loaded.components, "a shiny cube", "", steps=2, embeddings=fitted).kwargs()
        without = enc.encode(loaded.components, "a shiny cube", "", steps=2).kwargs()
    a, b = with_emb["prompt_embeds"][0], without["prompt_embeds"][0]
    # causal attention: positions before the embedding ("<start> a") are untouched, later ones change
    assert torch.equal(a[:2], b[:2]) and not torch.equal(a[2:4], b[2:4])


def test_cached_lora_set_costs_no_read(net_studio):
    prompt = "a cube <lora:style:0.5> <lora:castle:0.5>"
    net_studio.generate(GenerationRequest(**{**BASE, "prompt": prompt}))
    reads = net_studio.loras.reads
    net_studio.generate(GenerationRequest(**{**BASE, "prompt": "a cube"}))
    net_studio.generate(GenerationRequest(**{**BASE, "prompt": prompt}))
    assert net_studio.loras.reads == reads


def test_api_lists_loras_and_embeddings(net_studio):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.api import build_router

    app = FastAPI()
    app.include_router(build_router(net_studio))
    client = TestClient(app)
    loras = client.get("/sdapi/v1/loras").json()
    names = {item["name"] for item in loras}
    assert {"style", "castle", "hada", "xl-only"} <= names
    castle = next(i for i in loras if i["name"] == "castle")
    assert castle["metadata"]["ss_base_model_version"] == "sd_v1" and castle["path"].endswith("castle.safetensors")
    net_studio.switch_checkpoint("tiny-sd1.safetensors")
    emb = client.get("/sdapi/v1/embeddings").json()
    assert emb["loaded"]["shiny"]["vectors"] == 2
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    assert any(u["name"] == "Lanczos" for u in client.get("/sdapi/v1/upscalers").json())
    res = client.post("/sdapi/v1/txt2img", json={"prompt": "a cube <lora:style:0.7>", "steps": 2, "width": 64,
                                                 "height": 64}).json()
    assert "Lora hashes" in __import__("json").loads(res["info"])["infotexts"][0]
