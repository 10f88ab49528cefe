"""launch.py's torch / xformers install decisions with fake platforms and nvidia-smi answers (pip never runs)."""
from __future__ import annotations

import importlib.util
import subprocess
import types
from pathlib import Path

import pytest

from studio.nvidia import NvidiaGpu, nvidia_gpus, parse_query

ROOT = Path(__file__).resolve().parents[1]
PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}
RTX = NvidiaGpu("NVIDIA GeForce RTX 3060", 12288, "581.15")


@pytest.fixture(scope="module")
def launch():
    spec = importlib.util.spec_from_file_location("_launch_install_under_test", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(launch, system, gpus, version=None, cuda="absent", env=None, force=False):
    cuda = launch.NO_TORCH if cuda == "absent" else cuda
    return launch.torch_step(system, gpus, env or {}, version, cuda, PINS, force=force)


def test_windows_with_an_nvidia_gpu_gets_the_cuda_wheel(launch):
    args, notes = step(launch, "Windows", [RTX])
    assert args[:2] == ["torch==2.14.1", "torchvision==0.29.1"]
    assert args[args.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cu130"
    assert "-c" in args and "--force-reinstall" not in args          # pins constrain torch's dependencies
    assert "RTX 3060" in notes[0] and "cu130" in notes[0]


def test_linux_with_an_nvidia_gpu_gets_the_cuda_wheel(launch):
    args, _ = step(launch, "Linux", [RTX])
    assert args[args.index("--extra-index-url") + 1] == launch.TORCH_CUDA_INDEX


@pytest.mark.parametrize("system,gpus", [("Darwin", []), ("Windows", []), ("Linux", [])])
def test_no_gpu_or_macos_uses_the_default_index(launch, system, gpus):
    args, notes = step(launch, system, gpus)
    assert args == ["torch==2.14.1", "torchvision==0.29.1", "-c", str(launch.REQUIREMENTS)]
    assert "PyPI" in notes[0]


def test_torch_index_url_overrides(launch):
    url = "https://download.pytorch.org/whl/cu126"
    for system, gpus in (("Windows", [RTX]), ("Linux", []), ("Darwin", [])):
        args, notes = step(launch, system, gpus, env={"TORCH_INDEX_URL": url})
        assert args[args.index("--extra-index-url") + 1] == url and "TORCH_INDEX_URL" in notes[0]


def test_a_cpu_build_on_a_gpu_machine_is_replaced(launch):
    # Windows' PyPI wheel: version without a local label, torch.version.cuda None
    args, notes = step(launch, "Windows", [RTX], version="2.14.1", cuda=None)
    assert "--force-reinstall" in args and launch.TORCH_CUDA_INDEX in args
    assert "CPU build" in notes[0]


def test_nothing_to_do_when_the_build_fits(launch):
    assert step(launch, "Windows", [RTX], version="2.14.1+cu130", cuda="13.0") == (None, [])
    assert step(launch, "Linux", [], version="2.14.1", cuda="13.0") == (None, [])
    assert step(launch, "Linux", [], version="2.14.1+cpu", cuda=None) == (None, [])       # no GPU: CPU is right
    assert step(launch, "Darwin", [], version="2.14.1", cuda=None) == (None, [])
    # a CPU index asked for on purpose is respected
    assert step(launch, "Windows", [RTX], version="2.14.1+cpu", cuda=None,
                env={"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"}) == (None, [])


def test_version_change_and_reinstall_flag(launch):
    args, notes = step(launch, "Windows", [RTX], version="2.13.0+cu128", cuda="12.8")
    assert args is not None and "--force-reinstall" not in args and "2.13.0" in notes[0]
    args, notes = step(launch, "Linux", [RTX], version="2.14.1+cu130", cuda="13.0", force=True)
    assert "--force-reinstall" in args and "--reinstall-torch" in notes[0]


def test_old_driver_gets_a_note(launch):
    old = NvidiaGpu("NVIDIA GeForce GTX 1660", 6144, "537.13")
    _, notes = step(launch, "Windows", [old])
    assert any("537.13" in n and "update the driver" in n for n in notes)


def test_installed_torch_cuda_reads_version_py(launch, monkeypatch, tmp_path):
    pkg = tmp_path / "torch"
    pkg.mkdir()
    spec = types.SimpleNamespace(submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: spec)
    (pkg / "version.py").write_text("__version__ = '2.14.1+cu130'\ncuda: Optional[str] = '13.0'\n")
    assert launch.installed_torch_cuda() == "13.0"
    (pkg / "version.py").write_text("__version__ = '2.14.1+cpu'\ncuda: Optional[str] = None\n")
    assert launch.installed_torch_cuda() is None
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    assert launch.installed_torch_cuda() == launch.NO_TORCH


def test_install_torch_skips_nvidia_smi_when_the_cuda_build_is_in(launch, monkeypatch):
    """The common re-start: a CUDA torch at the pinned version costs no nvidia-smi call and no pip."""
    from importlib import metadata
    monkeypatch.setattr(metadata, "version", lambda name: "2.14.1+cu130")
    monkeypatch.setattr(launch, "installed_torch_cuda", lambda: "13.0")
    monkeypatch.setattr(launch, "_load_by_path", lambda name: pytest.fail("nvidia-smi asked"))
    monkeypatch.setattr(launch, "pip_install", lambda *a: pytest.fail("pip ran"))
    launch.install_torch()


def test_install_torch_runs_pip_for_a_cpu_build(launch, monkeypatch):
    from importlib import metadata
    import platform
    monkeypatch.setattr(metadata, "version", lambda name: "2.14.1")
    monkeypatch.setattr(launch, "installed_torch_cuda", lambda: None)
    monkeypatch.setattr(platform, "system", lambda: "Windows")
    monkeypatch.setattr(launch, "_load_by_path", lambda name: types.SimpleNamespace(nvidia_gpus=lambda: [RTX]))
    ran = []
    monkeypatch.setattr(launch, "pip_install", lambda *a: ran.append(a))
    monkeypatch.setattr(launch, "say", lambda message: None)
    launch.install_torch()
    assert len(ran) == 1 and "--force-reinstall" in ran[0] and launch.TORCH_CUDA_INDEX in ran[0]


def test_failed_xformers_install_does_not_stop_start_up(launch, monkeypatch):
    import torch
    monkeypatch.setattr(launch, "installed_versions", lambda: {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    said = []
    monkeypatch.setattr(launch, "say", said.append)

    def failing_pip(*args):
        raise SystemExit("[studio] pip failed (exit code 1) running: pip install xformers")
    monkeypatch.setattr(launch, "pip_install", failing_pip)
    launch.install_xformers()   # returns: start-up goes on
    assert any(m.startswith("WARNING: xformers could not be installed") for m in said)


def test_xformers_is_constrained_by_the_pins(launch):
    args = launch.xformers_args(launch.TORCH_CUDA_INDEX)
    assert args[:3] == ["xformers", "-c", str(launch.REQUIREMENTS)] and launch.TORCH_CUDA_INDEX in args
    assert launch.xformers_args(None) == ["xformers", "-c", str(launch.REQUIREMENTS)]


def test_reinstall_torch_flag(launch):
    cli = launch.load_cli()
    assert cli.build_parser().parse_args(["--reinstall-torch"]).reinstall_torch is True
    assert cli.settings_overrides(cli.build_parser().parse_args(["--reinstall-torch"])) == {}


# ---- nvidia-smi --------------------------------------------------------------------------------------------
def test_nvidia_smi_output_is_parsed():
    text = "NVIDIA GeForce RTX 3060, 12288, 581.15\nNVIDIA GeForce GTX 1660 SUPER, 6144, 537.13\n\ngarbage\n"
    assert parse_query(text) == [RTX, NvidiaGpu("NVIDIA GeForce GTX 1660 SUPER", 6144, "537.13")]
    assert parse_query(text)[1].driver_major == 537


def test_nvidia_smi_missing_failing_or_hanging():
    assert nvidia_gpus(which=lambda name: None) == []
    present = lambda name: "/usr/bin/nvidia-smi"  # noqa: E731
    failed = lambda *a, **k: types.SimpleNamespace(returncode=9, stdout="")  # noqa: E731
    assert nvidia_gpus(run=failed, which=present) == []

    def hangs(*a, **k):
        raise subprocess.TimeoutExpired("nvidia-smi", 10)
    assert nvidia_gpus(run=hangs, which=present) == []
    ok = lambda cmd, **k: types.SimpleNamespace(returncode=0, stdout="NVIDIA GeForce RTX 3060, 12288, 581.15\n")  # noqa: E731
    assert nvidia_gpus(run=ok, which=present) == [RTX]


def test_stdlib_helpers_load_by_path_before_the_venv_exists(launch):
    """A fresh clone has no venv yet: launch.py loads studio/nvidia.py by path (its dataclass needs the module
    registered, as an import would) and asks it for GPUs."""
    module = launch._load_by_path("nvidia")
    assert isinstance(module.nvidia_gpus(), list) and module.NvidiaGpu.__module__ == "_studio_nvidia"


def test_the_suite_runs_on_two_workers_unless_the_caller_chooses(launch, monkeypatch):
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 2)
    assert launch.test_workers([]) == ["-n", "2", "--dist", "loadfile"]
    assert launch.test_workers(["-k", "cli"]) == ["-n", "2", "--dist", "loadfile"]
    assert launch.test_workers(["-n", "4"]) == [] and launch.test_workers(["-p", "no:xdist"]) == []
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 1)
    assert launch.test_workers([]) == []
