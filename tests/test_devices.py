"""Device decisions with a simulated GPU: precision per card, backend flags, the xformers probe, pinned moves."""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from studio import devices
from studio.errors import StudioError
from studio.nvidia import NvidiaGpu
from studio.settings import Settings

CUDA = torch.device("cuda")


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], bf16: bool | None = None, total_gib: float = 8):
    """torch.cuda as a machine with one ``name`` card would answer."""
    bf16 = capability >= (8, 0) if bf16 is None else bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    # the real function's default counts emulation as support (True on nearly any card): we must ask without it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    props = types.SimpleNamespace(name=name, total_memory=int(total_gib * 2**30), major=capability[0],
                                  minor=capability[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    # backend flags are process-wide: monkeypatch puts them back after the test
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", _recording(torch.set_float32_matmul_precision))


def _recording(real):
    calls = []

    def record(value):
        calls.append(value)
        real(value)
    record.calls = calls
    return record


@pytest.fixture()
def settings(tmp_path):
    """Empty folders: these tests need a manager, not models."""
    return Settings(models_dir=str(tmp_path / "models"), data_dir=str(tmp_path / "data"),
                    outdir=str(tmp_path / "outputs"))


@pytest.fixture(autouse=True)
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("name,capability,expected", [
    ("NVIDIA GeForce GTX 1660 SUPER", (7, 5), torch.float32),   # TU116: black images in fp16
    ("NVIDIA GeForce GTX 1650", (7, 5), torch.float32),         # TU117
    ("NVIDIA GeForce RTX 2060", (7, 5), torch.float16),         # same capability, fp16 works
    ("NVIDIA GeForce GTX 1080 Ti", (6, 1), torch.float16),
    ("NVIDIA GeForce RTX 4090", (8, 9), torch.float16),
])
def test_auto_precision_per_card(monkeypatch, caplog, name, capability, expected):
    fake_gpu(monkeypatch, name, capability)
    with caplog.at_level(logging.WARNING, logger="studio.devices"):
        assert devices.resolve_dtype(Settings(), CUDA) is expected
    assert ("black images" in caplog.text) == (expected is torch.float32)
    # an explicit choice is obeyed on every card
    assert devices.resolve_dtype(Settings(precision="fp16"), CUDA) is torch.float16


def test_auto_precision_off_the_gpu():
    assert devices.resolve_dtype(Settings(), torch.device("cpu")) is torch.float32
    assert devices.resolve_dtype(Settings(), torch.device("mps")) is torch.float16


def test_bf16_refused_on_a_card_without_it(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 2080", (7, 5))
    with pytest.raises(StudioError, match="no native bf16") as info:
        devices.resolve_dtype(Settings(precision="bf16"), CUDA)
    assert info.value.field == "precision" and "fp16" in info.value.fix
    # torch's default answer (emulation counts) would have said yes
    assert torch.cuda.is_bf16_supported() is True


def test_bf16_on_ampere_and_the_cpu(monkeypatch):
    assert devices.resolve_dtype(Settings(precision="bf16"), torch.device("cpu")) is torch.bfloat16
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 3090", (8, 6))
    assert devices.resolve_dtype(Settings(precision="bf16"), CUDA) is torch.bfloat16
    # capability 8.x but the driver/runtime says no native bf16 (e.g. an old CUDA build): refused too
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(StudioError, match="bf16"):
        devices.resolve_dtype(Settings(precision="bf16"), CUDA)


def test_tf32_and_cudnn_flags_set_when_cuda_is_resolved(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 3060", (8, 6))
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    assert devices.resolve_device(Settings()) == CUDA
    assert torch.set_float32_matmul_precision.calls == ["high"]
    assert torch.backends.cuda.matmul.allow_tf32 is True          # what "high" means for matmuls
    assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cudnn.benchmark is False

    devices.configure_backends(Settings(allow_tf32=False, cudnn_benchmark=True), CUDA)
    assert torch.set_float32_matmul_precision.calls[-1] == "highest"
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cudnn.benchmark is True


def test_gtx16_gets_cudnn_benchmark(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce GTX 1660 Ti", (7, 5))
    torch.backends.cudnn.benchmark = False
    devices.configure_backends(Settings(), CUDA)
    assert torch.backends.cudnn.benchmark is True  # A1111: it makes fp16 work on several of these cards


def test_no_backend_flags_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch, "set_float32_matmul_precision", _recording(torch.set_float32_matmul_precision))
    assert devices.resolve_device(Settings(device="cpu")) == torch.device("cpu")
    assert torch.set_float32_matmul_precision.calls == []


def test_startup_line(monkeypatch):
    line = devices.describe(Settings(), torch.device("cpu"), torch.float32)
    assert line.startswith("Device: cpu (") and "GiB RAM" in line and "precision fp32" in line
    assert "offload none" in line and "attention sdpa" in line
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 3060", (8, 6), total_gib=12)
    line = devices.describe(Settings(offload="medvram", no_half_vae=True, xformers=True), CUDA, torch.float16)
    assert line == ("Device: cuda:0 NVIDIA GeForce RTX 3060 (12.0 GiB VRAM, compute 8.6), precision fp16, VAE fp32, "
                    "offload medvram, attention xformers (checked at first use)")


def test_warning_when_torch_cannot_see_an_nvidia_gpu(monkeypatch):
    gpus = [NvidiaGpu("NVIDIA GeForce RTX 3060", 12288, "560.35")]
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.version, "cuda", None)
    warning = devices.cpu_build_warning(Settings(), cpu, gpus)
    assert "RTX 3060" in warning and "CPU build" in warning and "--reinstall-torch" in warning
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    warning = devices.cpu_build_warning(Settings(), cpu, gpus)
    assert "CUDA is not available" in warning and "560.35" in warning and "driver" in warning
    assert devices.cpu_build_warning(Settings(), cpu, []) is None           # no NVIDIA GPU: nothing to say
    assert devices.cpu_build_warning(Settings(device="cpu"), cpu, gpus) is None   # the CPU on purpose
    assert devices.cpu_build_warning(Settings(), CUDA, gpus) is None


# ---- xformers ---------------------------------------------------------------------------------------------------
def _fake_xformers(monkeypatch, attention):
    pkg = types.ModuleType("xformers")
    pkg.__version__ = "0.0.99"
    pkg.__path__ = []
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = attention
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(devices.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "xformers" else None)


def test_probe_rejects_a_broken_xformers(monkeypatch, caplog):
    def broken(q, k, v):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` (built for torch 2.1)")
    _fake_xformers(monkeypatch, broken)
    with caplog.at_level(logging.WARNING, logger="studio.devices"):
        assert devices.probe_xformers(torch.device("cpu")) is False
    assert "0.0.99" in caplog.text and "scaled-dot-product" in caplog.text and "NotImplementedError" in caplog.text


def test_probe_accepts_a_working_xformers(monkeypatch):
    calls = []
    _fake_xformers(monkeypatch, lambda q, k, v: calls.append((q.shape, q.dtype)) or q)
    assert devices.probe_xformers(torch.device("cpu")) is True
    assert calls == [((1, 2, 40), torch.float32), ((1, 2, 40), torch.float16)]


def test_xformers_probed_once_per_device(monkeypatch):
    runs = []
    monkeypatch.setattr(devices, "probe_xformers", lambda device: runs.append(device) or False)
    cache: dict = {}
    on = Settings(xformers=True)
    assert not devices.xformers_usable(on, CUDA, cache) and not devices.xformers_usable(on, CUDA, cache)
    assert runs == [CUDA]
    assert not devices.xformers_usable(Settings(), CUDA, cache)              # not asked for
    assert not devices.xformers_usable(on, torch.device("cpu"), cache)       # CUDA only
    assert runs == [CUDA]


def test_manager_falls_back_to_sdpa_once(monkeypatch, settings, caplog):
    """A broken xformers: no job calls diffusers' enable (which would raise every time), one warning in all."""
    from studio.manager import PipelineManager
    from studio.registry import Registry
    from studio.hashes import HashCache

    s = settings.replace(xformers=True)
    manager = PipelineManager(s, Registry(s, HashCache(s.cache_file)))
    manager.__dict__["device"] = CUDA   # the cached device as on a GPU machine
    probes = []

    def probe(device):
        probes.append(device)
        devices.log.warning("xformers does not work")
        return False
    monkeypatch.setattr(devices, "probe_xformers", probe)

    class Pipe:
        enabled = 0
        components: dict = {}

        def enable_xformers_memory_efficient_attention(self):
            Pipe.enabled += 1
            raise RuntimeError("CUDA error: no kernel image is available")
    with caplog.at_level(logging.WARNING, logger="studio.devices"):
        for _ in range(3):
            manager._apply_device_options(Pipe())
    assert Pipe.enabled == 0 and probes == [CUDA] and caplog.text.count("xformers does not work") == 1


# ---- moves between RAM and VRAM ---------------------------------------------------------------------------------
class Recorder:
    """A module whose weights sit on ``device``; records how it is moved."""

    def __init__(self, device=torch.device("cpu")):
        self.device, self.calls = device, []

    def parameters(self):
        return iter([types.SimpleNamespace(device=self.device)])

    def to(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self


def test_moves_with_cuda_are_non_blocking_and_synchronised(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    up = Recorder()
    devices.move_module(up, CUDA)
    assert up.calls == [((CUDA,), {"non_blocking": True})] and syncs == []   # pinned -> GPU: async DMA
    down = Recorder(CUDA)
    devices.move_module(down, torch.device("cpu"))
    # GPU -> CPU non-blocking lands in pinned memory; one synchronize before anyone reads it on the CPU
    assert down.calls == [((torch.device("cpu"),), {"non_blocking": True})] and syncs == [CUDA]


def test_moves_without_cuda_or_pinning_are_plain(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: pytest.fail("no CUDA here"))
    m = Recorder()
    devices.move_module(m, torch.device("cpu"))
    devices.move_module(m, CUDA, pin=False)
    assert m.calls == [((torch.device("cpu"),), {"non_blocking": False}), ((CUDA,), {"non_blocking": False})]
    real = torch.nn.Linear(3, 3)
    before = real.weight.data_ptr()
    devices.move_module(real, torch.device("cpu"))
    assert real.weight.data_ptr() == before    # CPU to CPU copies nothing


def test_manager_moves_through_the_helper(monkeypatch, settings):
    from studio.manager import Entry, PipelineManager
    from studio.registry import Registry
    from studio.hashes import HashCache

    manager = PipelineManager(settings, Registry(settings, HashCache(settings.cache_file)))
    manager.__dict__["device"] = CUDA
    moved = []
    monkeypatch.setattr(devices, "move_module", lambda module, target, pin=True: moved.append((target, pin)))
    monkeypatch.setattr(devices, "release_memory", lambda device=None: None)
    manager._move(Entry(("vae",), "vae", torch.nn.Linear(2, 2), 24, "device"), "cpu")
    manager.settings = settings.replace(pin_memory=False)
    manager._move(Entry(("vae",), "vae", torch.nn.Linear(2, 2), 24, "cpu"), "device")
    assert moved == [(torch.device("cpu"), True), (CUDA, False)]


def test_studio_logs_the_device_at_start(settings, caplog, monkeypatch):
    from studio.app import Studio

    monkeypatch.setattr("studio.nvidia.nvidia_gpus", lambda: [NvidiaGpu("NVIDIA GeForce RTX 3060", 12288, "581")])
    monkeypatch.setattr(torch.version, "cuda", None)
    studio = Studio(settings, load_extensions=False)
    try:
        with caplog.at_level(logging.INFO, logger="studio.app"):
            studio.warm_up()
    finally:
        studio.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "studio.app"]
    assert any(m.startswith("Device: cpu (") and "precision fp32" in m for m in lines)
    assert any("CPU build" in m and "RTX 3060" in m for m in lines)
