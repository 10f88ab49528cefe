"""ControlNet titles: each model its own hash (never sha256 of nothing), diffusers folders by their weights."""
from __future__ import annotations

import hashlib
import os

import pytest

from studio.controlnet.models import ControlNetLibrary
from studio.hashes import HashCache, legacy_model_hash, sha256_file
from tests import controlnets, tinymodels

EMPTY = hashlib.sha256(b"").hexdigest()[:8]   # e3b0c442


@pytest.fixture(scope="module")
def nets():
    comps = tinymodels.make_tiny("sd1", seed=0)
    return (controlnets.make_controlnet(comps.unet, seed=0),)


def test_every_controlnet_gets_its_own_hash(nets, settings):
    root = settings.controlnet_path
    root.mkdir(parents=True, exist_ok=True)
    # files under 1 MiB (A1111's model_hash reads nothing there); the listing only hashes, it does not parse
    (root / "control_a.safetensors").write_bytes(os.urandom(5000))
    (root / "control_b.safetensors").write_bytes(os.urandom(0x100000))
    folder = controlnets.write_diffusers(nets[0], root / "cn-folder")
    big = root / "control_big.pth"                      # past 1 MiB: A1111's model_hash, as the extension shows
    big.write_bytes(os.urandom(0x100000 + 0x20000))
    lib = ControlNetLibrary(settings, HashCache(None))
    a, b, f, g = (lib.find(n) for n in ("control_a", "control_b", "cn-folder", "control_big"))
    assert EMPTY not in {a.hash, b.hash, f.hash}
    assert a.hash == sha256_file(a.path)[:8] and b.hash == sha256_file(b.path)[:8] and a.hash != b.hash
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    assert os.path.getsize(weights) > 0x110000 and f.title == f"cn-folder [{legacy_model_hash(weights)}]"
    assert g.hash == legacy_model_hash(big) and g.title == f"control_big [{g.hash}]"
    assert lib.find(f.title) is f and lib.find(a.hash) is a
