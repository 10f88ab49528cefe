"""The trained demo model: install (copy, atomic, idempotent), ``launch.py --demo``, the note that says what it
knows, and the native size a checkpoint declares in its header."""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest

from studio import demo
from studio.demo_world import COLOUR_NAMES, HELD_OUT, POSITION_NAMES, SHAPES, SIZE_NAMES, parse_prompt
from studio.registry import CheckpointInfo, Registry, read_native_size
from studio.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def settings_in(tmp_path, **kw) -> Settings:
    return Settings(models_dir=str(tmp_path / "models"), data_dir=str(tmp_path / "data"),
                    outdir=str(tmp_path / "out"), **kw)


def test_install_copies_the_shipped_file_once(tmp_path):
    s = settings_in(tmp_path)
    path = demo.install_demo_model(s)
    assert path == s.ckpt_path / demo.TRAINED_NAME
    assert path.is_file() and not path.is_symlink()
    assert path.read_bytes() == demo.TRAINED_FILE.read_bytes()
    assert os.stat(path).st_ino != os.stat(demo.TRAINED_FILE).st_ino        # a copy, not a hard link
    mtime = path.stat().st_mtime_ns
    assert demo.install_demo_model(s) == path and path.stat().st_mtime_ns == mtime   # idempotent: not copied again
    assert [p.name for p in s.ckpt_path.iterdir()] == [demo.TRAINED_NAME]      # no .part left behind
    controlnet = s.controlnet_path / demo.CONTROLNET_NAME                       # its ControlNet comes along
    assert controlnet.read_bytes() == demo.CONTROLNET_FILE.read_bytes()
    assert [p.name for p in s.controlnet_path.iterdir()] == [demo.CONTROLNET_NAME]


def test_install_replaces_a_truncated_file_or_a_symlink(tmp_path):
    s = settings_in(tmp_path)
    s.ckpt_path.mkdir(parents=True)
    (s.ckpt_path / demo.TRAINED_NAME).write_bytes(b"half a file")
    demo.install_demo_model(s)
    assert (s.ckpt_path / demo.TRAINED_NAME).stat().st_size == demo.TRAINED_FILE.stat().st_size
    (s.ckpt_path / demo.TRAINED_NAME).unlink()
    (s.ckpt_path / demo.TRAINED_NAME).symlink_to(demo.TRAINED_FILE)
    path = demo.install_demo_model(s)
    assert not path.is_symlink() and path.stat().st_size == demo.TRAINED_FILE.stat().st_size


def test_install_is_atomic(tmp_path, monkeypatch):
    """A copy that fails half-way leaves only the hidden .part file, which the checkpoint list skips."""
    import shutil
    s = settings_in(tmp_path)

    def broken_copy(src, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(OSError):
        demo.install_demo_model(s)
    assert not (s.ckpt_path / demo.TRAINED_NAME).exists()
    assert Registry(s).checkpoints() == []


def test_description_is_built_from_the_world():
    text = demo.demo_description()
    for word in (*SHAPES, *COLOUR_NAMES, *SIZE_NAMES, *POSITION_NAMES):
        assert word in text, word
    assert f"{demo.NATIVE_SIZE}×{demo.NATIVE_SIZE} px" in text and "128 px" in text and "Hires. fix 2×" in text
    assert "never seen hearts or stripes" in text and "Train" in text and "Example dataset" in text
    assert all(h not in text.split("never seen")[0] for h in HELD_OUT)   # held-out words only in that sentence
    for prompt in demo.EXAMPLE_PROMPTS:          # the examples ask only for what the world has
        asked = parse_prompt(prompt)
        assert prompt in text and asked["shape"] in SHAPES and asked["colour"] in COLOUR_NAMES
        assert asked["background"] in COLOUR_NAMES


def test_is_demo_checkpoint():
    assert demo.is_demo_checkpoint("demo-shapes.safetensors [0123456789]")
    assert demo.is_demo_checkpoint("demo-shapes") and demo.is_demo_checkpoint("sub/demo-shapes.safetensors")
    assert not demo.is_demo_checkpoint("demo-untrained.safetensors") and not demo.is_demo_checkpoint(None)


def _with_metadata(path: Path, meta: dict) -> Path:
    from safetensors.torch import save_file
    import torch
    save_file({"x": torch.zeros(1)}, str(path), metadata=meta)
    return path


def test_native_size_from_the_header(tmp_path):
    assert read_native_size(demo.TRAINED_FILE) == (64, 64)
    assert read_native_size(_with_metadata(tmp_path / "a.safetensors", {"modelspec.resolution": "1024x768"})) \
        == (1024, 768)
    assert read_native_size(_with_metadata(tmp_path / "b.safetensors", {"modelspec.resolution": "512"})) == (512, 512)
    assert read_native_size(_with_metadata(tmp_path / "c.safetensors", {"modelspec.resolution": "big"})) is None
    assert read_native_size(_with_metadata(tmp_path / "d.safetensors", {})) is None
    (tmp_path / "e.safetensors").write_bytes(b"not a safetensors file")
    assert read_native_size(tmp_path / "e.safetensors") is None
    info = CheckpointInfo("a.safetensors", tmp_path / "a.safetensors", "file")
    assert info.native_size == (1024, 768)
    _with_metadata(tmp_path / "a.safetensors", {"modelspec.resolution": "640x640"})   # rewritten: read again
    os.utime(tmp_path / "a.safetensors", ns=(1, 1))
    assert info.native_size == (640, 640)
    assert CheckpointInfo("x/y", Path("x/y"), "hub").native_size is None


def test_size_sliders_follow_the_declared_native_size(tmp_path):
    """webui.demo_ui.follow: to the model's size from the previous model's size or the default; a size the user
    chose stays; back to 512 only from the demo's 64."""
    from webui.demo_ui import follow
    s = settings_in(tmp_path)
    demo.install_demo_model(s)
    _with_metadata(s.ckpt_path / "plain.safetensors", {})

    from studio.app import Studio
    studio = Studio(s, load_extensions=False)
    try:
        show, moved, now = follow(studio, demo.TRAINED_NAME, None, [(512, 512), (96, 512)])
        assert show and moved == [[64, 64], None] and now == [64, 64]
        show, moved, now = follow(studio, "plain.safetensors", now, [(64, 64), (96, 512), (80, 80)])
        assert not show and moved == [[512, 512], None, None] and now == [512, 512]
    finally:
        studio.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def launch(monkeypatch):
    spec = importlib.util.spec_from_file_location("_launch_demo_under_test", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    served = []
    import webui.server
    monkeypatch.setattr(webui.server, "serve", lambda settings, args: served.append(settings) or 0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return module, served


def test_launch_demo_installs_the_model_and_makes_it_the_default(launch, tmp_path, capsys):
    module, served = launch
    cli = module.load_cli()
    argv = ["--demo", "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
            "--outdir", str(tmp_path / "out"), "--port", str(_free_port())]
    assert module.serve(cli.build_parser().parse_args(argv), cli) == 0
    settings = served[0]
    assert settings.default_checkpoint == demo.TRAINED_NAME
    installed = settings.ckpt_path / demo.TRAINED_NAME
    assert installed.is_file() and not installed.is_symlink()
    out = capsys.readouterr().out
    assert "Demo model" in out and "toy" in out and "coloured shape" in out and "64 px" in out
    assert str(installed) in out
    assert "--demo" in cli.build_parser().format_help() and "toy" in cli.build_parser().format_help()


def test_launch_demo_keeps_a_configured_default(launch, tmp_path):
    module, served = launch
    cli = module.load_cli()
    argv = ["--demo", "--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"),
            "--outdir", str(tmp_path / "out"), "--port", str(_free_port()), "--ckpt", "mine.safetensors"]
    args = cli.build_parser().parse_args(argv)
    assert module.serve(args, cli) == 0
    assert served[0].default_checkpoint == "mine.safetensors"
    assert (served[0].ckpt_path / demo.TRAINED_NAME).is_file()


def test_demo_module_is_light():
    """studio.demo is imported by the UI at page build: no torch, and no untrained-model builders left in it."""
    import subprocess
    code = ("import sys; import studio.demo as d; print('torch' in sys.modules, hasattr(d, 'make_tiny'), "
            "hasattr(d, 'create_demo_checkpoint'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False", "False"], done.stderr
