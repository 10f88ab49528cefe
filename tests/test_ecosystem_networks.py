"""LoRA and embedding files added after start are found without a manual refresh (A1111 rescans)."""
from __future__ import annotations

import os

import pytest
import torch

from studio.adapters import EmbeddingLibrary, LoraLibrary
from studio.hashes import HashCache
from tests import lorafiles as lf
from tests.tinymodels import make_tiny


@pytest.fixture(scope="module")
def sd1():
    return make_tiny("sd1", seed=0)


def test_unknown_lora_name_rescans_before_the_warning(settings, sd1):
    settings.lora_path.mkdir(parents=True, exist_ok=True)
    lib = LoraLibrary(settings, HashCache(None))
    assert lib.find("new") is None
    lf.write(settings.lora_path / "new.safetensors", lf.kohya_lora(sd1, seed=9)[0])
    active, warnings = lib.resolve([("new", 1.0, 1.0), ("absent", 1.0, 1.0)])
    assert len(active) == 1 and active[0][0].name == "new"
    assert warnings == ["Networks not found: absent"]


def test_known_names_do_not_rescan(settings, sd1, monkeypatch):
    lf.write(settings.lora_path / "a.safetensors", lf.kohya_lora(sd1, seed=1)[0])
    lib = LoraLibrary(settings, HashCache(None))
    monkeypatch.setattr(lib, "refresh", lambda: pytest.fail("rescanned for a known name"))
    active, warnings = lib.resolve([("a", 1.0, 1.0)])
    assert len(active) == 1 and warnings == []


def test_embedding_added_after_start_is_used(settings, sd1):
    d = settings.embeddings_path
    (d / "sub").mkdir(parents=True, exist_ok=True)
    lib = EmbeddingLibrary(settings, HashCache(None))
    assert lib.for_model(sd1)[0] == {}
    g = torch.Generator().manual_seed(0)
    lf.write(d / "sub" / "fresh.safetensors", {"emb_params": torch.randn(2, 32, generator=g)})
    # make sure the folder's mtime moves even on a file system with coarse timestamps
    st = os.stat(d / "sub")
    os.utime(d / "sub", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    loaded, _ = lib.for_model(sd1)
    assert set(loaded) == {"fresh"} and loaded["fresh"].n_vectors == 2
    reads = lib.reads
    assert lib.refresh_if_changed() is False and lib.for_model(sd1)[0].keys() == {"fresh"} and lib.reads == reads
