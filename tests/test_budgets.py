"""Memory budgets: the VRAM budget counts the cached models as ours, a switch makes room before loading, and the
stats report RAM held on a CPU-only machine. The GPU is simulated by monkeypatched torch.cuda functions."""
from __future__ import annotations

import pytest
import torch

from studio import devices
from studio.settings import Settings

GiB = 1024**3


@pytest.fixture()
def fake_cuda(monkeypatch):
    """A card whose free memory and allocator-held bytes the test sets."""
    card = {"free": 0, "total": 0, "reserved": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card["free"], card["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: card["reserved"])
    return card


def test_vram_budget_counts_cached_models_as_ours(fake_cuda):
    settings, cuda = Settings(), torch.device("cuda")
    fake_cuda.update(free=int(23.5 * GiB), total=24 * GiB, reserved=0)   # a 24 GB card, 0.5 GB for the context
    empty = devices.device_budget(settings, cuda)
    assert empty == int(20.5 * GiB)
    # 14 GB of models cached: free memory drops, but the budget must not (they are the cache's own bytes)
    fake_cuda.update(free=int(9.5 * GiB), reserved=14 * GiB)
    assert devices.device_budget(settings, cuda) == empty
    # another program takes 4 GB: that is gone for us
    fake_cuda.update(free=int(5.5 * GiB))
    assert devices.device_budget(settings, cuda) == int(16.5 * GiB)


def test_vram_reserve_scales_with_small_cards(fake_cuda):
    cuda = torch.device("cuda")
    fake_cuda.update(free=int(5.6 * GiB), total=6 * GiB)
    assert devices.device_budget(Settings(), cuda) == int(5.6 * GiB) - int(1.5 * GiB)
    assert devices.vram_reserve(2 * GiB) == GiB          # never below 1 GiB
    assert devices.vram_reserve(48 * GiB) == 3 * GiB
    assert devices.device_budget(Settings(vram_budget_mb=5000), cuda) == 5000 * 1024**2   # the setting wins


def test_ram_used_on_a_cpu_only_machine(studio):
    studio.switch_checkpoint("tiny-sd1.safetensors")
    stats = studio.manager.stats()
    held = sum(e["bytes"] for e in stats["entries"])
    assert held > 0 and stats["ram_used"] == held and stats["device_used"] == held


def test_switch_past_the_budget_evicts_before_loading(settings):
    """With room for one model, A -> B drops A before B's file is read, not after (three models at the peak)."""
    from studio.loading.single_file import load_single_file
    from studio.manager import PipelineManager
    from studio.registry import Registry

    seen = []

    def loader(path, **kw):
        seen.append([e.label for e in manager._entries.values()])
        return load_single_file(path, **kw)

    budget_mb = 20  # a tiny SD1 checkpoint is 13 MB: one fits, two do not
    s = settings.replace(ram_budget_mb=budget_mb, vram_budget_mb=budget_mb)
    manager = PipelineManager(s, Registry(s), loaders={"file": loader})
    manager.load("tiny-sd1.safetensors")
    manager.load("tiny-sd1-b.safetensors")
    assert seen == [[], []], f"models held while the next one was read: {seen}"
    assert [e["label"] for e in manager.stats()["entries"]] == ["tiny-sd1-b.safetensors"]


def test_offloaded_models_are_bounded_by_ram_not_vram(settings):
    """Under --medvram / --lowvram the cached models rest in RAM: a small card must not evict them."""
    from studio.manager import PipelineManager
    from studio.registry import Registry

    s = settings.replace(offload="medvram", vram_budget_mb=20, ram_budget_mb=200)  # VRAM for one model, RAM for 10
    manager = PipelineManager(s, Registry(s))
    manager.offload_on_cpu = True
    manager.load("tiny-sd1.safetensors")
    manager.load("tiny-sd1-b.safetensors")
    assert manager.single_tier and manager.budget("device") == 200 * 1024**2
    assert sorted(e["label"] for e in manager.stats()["entries"]) == ["tiny-sd1-b.safetensors", "tiny-sd1.safetensors"]


@pytest.mark.parametrize("name", ["tiny-sd1.safetensors", "tiny-sd1-diffusers", "tiny-sdxl.safetensors"])
def test_size_from_headers_matches_the_loaded_model(settings, name):
    from studio.manager import PipelineManager
    from studio.registry import Registry

    manager = PipelineManager(settings, Registry(settings))
    info = manager.registry.find_checkpoint(name)
    estimate = manager._estimate(info)
    manager.load(info)
    actual = manager.stats()["entries"][0]["bytes"]
    assert abs(estimate - actual) <= actual * 0.02, (estimate, actual)


def test_size_follows_the_target_dtype(models_dir):
    from studio.loading.sizes import checkpoint_bytes

    path = models_dir / "Stable-diffusion" / "tiny-sd1.safetensors"
    fp32 = checkpoint_bytes(path, "file", 4, 4)
    fp16 = checkpoint_bytes(path, "file", 2, 2)
    no_half_vae = checkpoint_bytes(path, "file", 2, 4)
    assert fp16 < no_half_vae < fp32 and abs(fp32 - 2 * fp16) < fp32 * 0.01
    ckpt = models_dir / "Stable-diffusion" / "old.ckpt"
    ckpt.write_bytes(b"\0" * 1234)
    assert checkpoint_bytes(ckpt, "file", 2, 2) == 1234     # a pickle has no header: its size stands in
    broken = models_dir / "Stable-diffusion" / "broken.safetensors"
    broken.write_bytes(b"\x05")
    assert checkpoint_bytes(broken, "file", 2, 2) is None   # the loader gives the message


def _entries_seen_by(monkeypatch, manager, module, name):
    """Wrap ``module.name`` (a loader) so each call records the labels cached at the moment it reads a file."""
    seen, real = [], getattr(module, name)

    def spy(*args, **kw):
        seen.append([e.label for e in manager._entries.values()])
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_vae_switch_past_the_budget_evicts_before_loading(settings, models_dir, monkeypatch):
    """Room for the checkpoint and one VAE: picking another VAE drops the first before reading the file."""
    import shutil

    from studio.loading import single_file
    from studio.manager import PipelineManager
    from studio.registry import Registry

    vaes = models_dir / "VAE"
    shutil.copy(vaes / "tiny-vae.safetensors", vaes / "tiny-vae-b.safetensors")
    manager = PipelineManager(settings, Registry(settings))
    with manager.acquire("tiny-sd1.safetensors", vae="tiny-vae.safetensors"):
        pass
    sizes = [e["bytes"] for e in manager.stats()["entries"]]
    monkeypatch.setattr(manager, "budget", lambda tier: sizes[0] + sizes[1] * 3 // 2)
    seen = _entries_seen_by(monkeypatch, manager, single_file, "load_vae_file")
    with manager.acquire("tiny-sd1.safetensors", vae="tiny-vae-b.safetensors"):
        pass
    assert seen == [["tiny-sd1.safetensors"]], f"models held while the next VAE was read: {seen}"
    assert [e["label"] for e in manager.stats()["entries"]] == ["tiny-sd1.safetensors", "VAE tiny-vae-b.safetensors"]


def test_module_size_hint_makes_room_before_loading(settings, monkeypatch):
    """An extra module (a ControlNet) with a size from its header evicts the LRU one before ``load()`` runs."""
    from studio.manager import PipelineManager
    from studio.registry import Registry

    manager = PipelineManager(settings, Registry(settings))
    nbytes = 64 * 64 * 4 + 64 * 4
    monkeypatch.setattr(manager, "budget", lambda tier: nbytes * 3 // 2)
    seen = []

    def load():
        seen.append([e.label for e in manager._entries.values()])
        return torch.nn.Linear(64, 64)

    for name in ("one", "two"):
        with manager.acquire_module(("net", name), name, load, size_hint=nbytes):
            pass
    assert seen == [[], []], f"modules held while the next one was read: {seen}"
    assert [e["label"] for e in manager.stats()["entries"]] == ["two"]


@pytest.mark.parametrize("kind", ["vae", "controlnet-ldm", "controlnet-diffusers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_module_size_from_headers_matches_the_loaded_module(models_dir, tmp_path, kind, dtype):
    from studio.controlnet import load_controlnet
    from studio.loading.single_file import load_vae_file
    from studio.loading.sizes import module_bytes
    from studio.manager import _module_bytes
    from tests import controlnets, tinymodels

    if kind == "vae":
        path = models_dir / "VAE" / "tiny-vae.safetensors"
        module = load_vae_file(path, dtype=dtype, device="cpu", family="sd1")
    else:
        cn = controlnets.make_controlnet(tinymodels.make_tiny("sd1", seed=0).unet, seed=0)
        if kind == "controlnet-ldm":
            path = controlnets.write_ldm(cn, tmp_path / "cn.safetensors")
        else:
            path = controlnets.write_diffusers(cn, tmp_path / "cn")
        module = load_controlnet(path, dtype=dtype)[0]
    actual = _module_bytes(module)
    estimate = module_bytes(path, dtype.itemsize)
    assert abs(estimate - actual) <= actual * 0.02, (estimate, actual)


def test_module_size_of_unreadable_or_pickled_files(tmp_path):
    from studio.loading.sizes import module_bytes

    pickle = tmp_path / "cn.pth"
    pickle.write_bytes(b"\0" * 1234)
    assert module_bytes(pickle, 2) == 1234            # no header: the file size stands in
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x05")
    assert module_bytes(broken, 2) is None            # the loader gives the message
    assert module_bytes(tmp_path / "missing", 2) is None
