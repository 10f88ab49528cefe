"""A1111 hashes and the persistent hash cache."""
import hashlib
import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from studio import hashes as H


@pytest.fixture
def big_file(tmp_path):
    data = os.urandom(0x100000 + 0x10000 + 1234)
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    return path, data


def test_sha256_and_short(big_file):
    path, data = big_file
    full = H.sha256_file(path)
    assert full == hashlib.sha256(data).hexdigest()
    assert H.short_hash(full) == full[:10]
    assert H.short_hash(full, 12) == full[:12]


def test_legacy_hash(big_file, tmp_path):
    path, data = big_file
    assert H.legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")  # nothing at 0x100000: A1111 hashes the empty read
    assert H.legacy_model_hash(small) == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"
    partial = tmp_path / "partial.bin"
    blob = os.urandom(0x100000 + 100)
    partial.write_bytes(blob)
    assert H.legacy_model_hash(partial) == hashlib.sha256(blob[0x100000:]).hexdigest()[:8]


def _lora(path, metadata=None):
    save_file({"lora_unet_down.lora_up.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "lora_unet_down.alpha": torch.tensor(4.0)}, str(path), metadata=metadata)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return hashlib.sha256(raw[8 + n:]).hexdigest()


def test_addnet_hash(tmp_path):
    path = tmp_path / "castle.safetensors"
    expected = _lora(path, {"ss_network_dim": "4"})
    assert H.addnet_hash(path) == expected
    assert H.addnet_hash_raw(path) == expected
    assert H.short_hash(H.addnet_hash(path), 12) == expected[:12]
    # the header (metadata) does not change the addnet hash, only the tensor bytes do
    other = tmp_path / "renamed.safetensors"
    assert _lora(other, {"ss_network_dim": "4", "ss_comment": "something else"}) == expected


def test_addnet_hash_uses_sshs_model_hash(tmp_path):
    path = tmp_path / "tagged.safetensors"
    given = "ab" * 32
    _lora(path, {"sshs_model_hash": given})
    assert H.addnet_hash(path) == given
    assert H.safetensors_metadata(path)["sshs_model_hash"] == given


def test_addnet_hash_of_other_formats_is_full_sha(tmp_path):
    path = tmp_path / "old.pt"
    path.write_bytes(b"not a safetensors file")
    assert H.addnet_hash(path) == hashlib.sha256(b"not a safetensors file").hexdigest()


def test_addnet_hash_tiny_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x01\x02")
    assert H.addnet_hash(path) == hashlib.sha256(b"").hexdigest()
    assert H.safetensors_metadata(path) == {}


def test_cache_computes_once_and_persists(tmp_path, big_file, monkeypatch):
    path, data = big_file
    cache_file = tmp_path / "cache" / "hashes.json"
    cache = H.HashCache(cache_file)
    assert cache.get_cached(path) is None
    assert cache.get_or_compute(path, "checkpoint") == hashlib.sha256(data).hexdigest()
    assert cache_file.is_file() and not [p for p in cache_file.parent.iterdir() if p.suffix == ".tmp"]

    calls = []
    real = H.sha256_file
    monkeypatch.setattr(H, "sha256_file", lambda p: calls.append(p) or real(p))
    monkeypatch.setitem(H._KINDS, "checkpoint", H.sha256_file)
    again = H.HashCache(cache_file)  # a new instance reads the file
    assert again.get_or_compute(path, "checkpoint") == hashlib.sha256(data).hexdigest()
    assert calls == []
    assert again.get_cached(path, "checkpoint") == hashlib.sha256(data).hexdigest()
    assert again.get_cached(path, "legacy") is None  # kinds are cached apart


def test_cache_recomputes_when_file_changes(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"one")
    cache = H.HashCache(tmp_path / "c.json")
    first = cache.get_or_compute(path, "sha256")
    assert first == hashlib.sha256(b"one").hexdigest()
    # same size, new mtime
    path.write_bytes(b"two")
    st = os.stat(path)
    os.utime(path, (st.st_atime, st.st_mtime + 10))
    assert cache.get_cached(path, "sha256") is None
    assert cache.get_or_compute(path, "sha256") == hashlib.sha256(b"two").hexdigest()
    # new size, same mtime
    mtime = os.stat(path).st_mtime
    path.write_bytes(b"three!")
    os.utime(path, (mtime, mtime))
    assert cache.get_or_compute(path, "sha256") == hashlib.sha256(b"three!").hexdigest()


def test_cache_kinds_and_keys(tmp_path):
    path = tmp_path / "lora.safetensors"
    expected = _lora(path)
    cache = H.HashCache(tmp_path / "c.json")
    assert cache.get_or_compute(path, "addnet") == expected
    assert cache.get_or_compute(path, "checkpoint") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert cache.get_or_compute(path, "legacy") == H.legacy_model_hash(path)
    data = json.loads((tmp_path / "c.json").read_text())
    keys = list(data["hashes"])
    assert len(keys) == 3 and all(str(path.resolve()) in k or os.path.abspath(path) in k for k in keys)
    with pytest.raises(ValueError):
        cache.get_or_compute(path, "nonsense")
    cache.forget(path)
    assert cache.get_cached(path, "addnet") is None


def test_corrupt_cache_file_starts_empty(tmp_path):
    cache_file = tmp_path / "c.json"
    cache_file.write_text("{not json")
    cache = H.HashCache(cache_file)
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    assert cache.get_or_compute(f, "sha256") == hashlib.sha256(b"x").hexdigest()
    assert json.loads(cache_file.read_text())["hashes"]


def test_cache_thread_safety(tmp_path):
    files = []
    for i in range(16):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(os.urandom(1000 + i))
        files.append(f)
    cache = H.HashCache(tmp_path / "c.json")
    errors = []

    def work():
        try:
            for f in files:
                assert cache.get_or_compute(f, "sha256") == hashlib.sha256(f.read_bytes()).hexdigest()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(json.loads((tmp_path / "c.json").read_text())["hashes"]) == 16
    fresh = H.HashCache(tmp_path / "c.json")
    assert all(fresh.get_cached(f, "sha256") for f in files)


def test_no_module_level_mutable_cache():
    a, b = H.HashCache(None), H.HashCache(None)
    assert a._entries is not b._entries


# ---- background hashing ----------------------------------------------------------------------------------------
def _gated_hashing(monkeypatch, gated=None):
    """compute_hash held up until ``gate`` is set (for every file, or for the file names in ``gated``)."""
    gate, calls, real = threading.Event(), [], H.compute_hash

    def held(path, kind="checkpoint"):
        calls.append(os.path.basename(path))
        if gated is None or os.path.basename(path) in gated:
            assert gate.wait(20), "the test never released the hash"
        return real(path, kind)

    monkeypatch.setattr(H, "compute_hash", held)
    return gate, calls


def _wait_for(predicate, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_background_hasher_hashes_each_file_once(tmp_path, monkeypatch):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"a" * 5000)
    b.write_bytes(b"b" * 7000)
    gate, calls = _gated_hashing(monkeypatch, gated={"a.safetensors"})
    hasher = H.BackgroundHasher(H.HashCache(tmp_path / "cache.json"))
    fa, fb = hasher.submit(a), hasher.submit(b)
    assert hasher.submit(a) is fa and hasher.submit(b) is fb
    _wait_for(lambda: calls == ["a.safetensors"])
    # b is only queued behind a: a foreground request takes it over instead of waiting for a
    assert hasher.get(b) == hashlib.sha256(b"b" * 7000).hexdigest() == fb.result(timeout=0)
    assert not fa.done()
    gate.set()
    assert fa.result(timeout=20) == hashlib.sha256(b"a" * 5000).hexdigest()
    assert hasher.get(a) == fa.result() and hasher.submit(a).result(timeout=0) == fa.result()
    assert calls == ["a.safetensors", "b.safetensors"]   # each file read once
    _wait_for(lambda: hasher._thread is None)                 # the thread ends when there is nothing to hash


def test_sd_models_list_hashes_in_the_background(settings, monkeypatch):
    import time

    from studio.api.routes import _Api
    from studio.app import Studio

    gate, _calls = _gated_hashing(monkeypatch)
    studio = Studio(settings)
    try:
        api = _Api(studio, {}, False)
        started = time.monotonic()
        first = {m["model_name"]: m for m in api.get_sd_models()}
        assert time.monotonic() - started < 2, "the list waited for hashes"
        assert first["tiny-sd1"]["hash"] is None and first["tiny-sd1"]["sha256"] is None
        assert first["tiny-sd1"]["title"] == "tiny-sd1.safetensors"
        gate.set()

        def filled():
            return all(m["sha256"] for m in api.get_sd_models())

        _wait_for(filled)
        listed = {m["model_name"]: m for m in api.get_sd_models()}
        path = settings.ckpt_path / "tiny-sd1.safetensors"
        sha = H.sha256_file(path)
        assert listed["tiny-sd1"]["sha256"] == sha and listed["tiny-sd1"]["hash"] == sha[:10]
        assert listed["tiny-sd1"]["title"] == f"tiny-sd1.safetensors [{sha[:10]}]"
        studio.registry.refresh()  # a rescan keeps what was hashed (the persistent cache)
        assert {m["model_name"]: m for m in api.get_sd_models()}["tiny-sd1"]["sha256"] == sha
    finally:
        gate.set()
        studio.close()


def test_first_load_does_not_wait_for_the_hash_but_the_infotext_has_it(studio, monkeypatch):
    import time

    from studio.request import GenerationRequest

    gate, _calls = _gated_hashing(monkeypatch)
    try:
        started = time.monotonic()
        studio.switch_checkpoint("tiny-sd1-b.safetensors")
        assert time.monotonic() - started < 15, "loading waited for the file's hash"
        assert studio.registry.find_checkpoint("tiny-sd1-b").sha256 is None
        threading.Timer(0.3, gate.set).start()
        result = studio.generate(GenerationRequest(prompt="a cube", width=64, height=64, steps=1, save_images=False,
                                                   checkpoint="tiny-sd1-b.safetensors"))
    finally:
        gate.set()
    sha = H.sha256_file(studio.settings.ckpt_path / "tiny-sd1-b.safetensors")
    assert f"Model hash: {sha[:10]}" in result.infotexts[0] and result.model_hash == sha[:10]
