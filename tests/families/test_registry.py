"""The family registry: one object per family, asked by everyone; no family named outside studio/families."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from studio import families
from studio.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[2]
NAMES = [f.name for f in families.all_families()]


def test_builtin_families_in_order():
    assert NAMES[:4] == ["sd1", "sd2", "sdxl", "sdxl_refiner"]
    assert len(set(NAMES)) == len(NAMES)


def test_nothing_outside_the_family_modules_compares_a_family_name():
    """The engine, manager, adapters, ControlNet, training, merge code and the UI ask the Family object."""
    literal = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, NAMES)))
    offenders = []
    for folder in ("studio", "webui", "tabs"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("studio/families/"):
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if literal.search(code):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "family names outside studio/families:\n" + "\n".join(offenders)


@pytest.mark.parametrize("text,name", [
    ("sd_v1", "sd1"), ("stable-diffusion-v1-5/lora", "sd1"), ("sd_v2_768_v", "sd2"),
    ("stable-diffusion-v2-768-v/lora", "sd2"), ("sdxl_base_v1-0", "sdxl"), ("stable-diffusion-xl-v1-base/lora", "sdxl"),
    ("sdxl_refiner_v1-0", "sdxl_refiner"), ("stable-diffusion-xl-v1-refiner", "sdxl_refiner"), ("", None),
    ("something-else", None)])
def test_metadata_versions_name_the_family(text, name):
    fam = families.from_version(text)
    assert (fam.name if fam else None) == name


def test_lora_layers_tell_the_family_only_when_they_can():
    assert families.from_lora({"te1"}, 768, {"te1": 768}).name == "sd1"
    assert families.from_lora({"te1"}, 1024, {"te1": 1024}).name == "sd2"
    assert families.from_lora({"te1", "te2"}).name == "sdxl"       # two encoders at any width
    assert families.from_lora(set(), 2048).name == "sdxl"           # UNet only, real width
    assert families.from_lora({"te1"}, 32, {"te1": 32}) is None     # tiny single-encoder: SD1 or SD2
    assert families.from_embedding({"single": 768}).name == "sd1"
    assert families.from_embedding({"single": 1024}).name == "sd2"
    assert families.from_embedding({"clip_l": 32, "clip_g": 48}).name == "sdxl"
    assert families.from_embedding({"single": 32}) is None


def test_a_file_two_families_claim_equally_is_refused():
    sd1, sd2 = families.get("sd1"), families.get("sd2")
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 64)}
    both = {**unet, sd1.text_encoders[0].ldm_prefix + "embeddings.token_embedding.weight": (49408, 32),
            sd2.text_encoders[0].ldm_prefix + "token_embedding.weight": (49408, 32)}
    with pytest.raises(ModelLoadError, match="two model families equally: SD 1.x and SD 2.x"):
        families.detect_ldm(both, "mixed.safetensors")


def test_unknown_family_names_are_labelled_plainly():
    assert families.get("nope") is None
    assert families.label("nope") == "nope" and families.label(None) == "unknown"
    assert families.short_label("flux") == "FLUX"
