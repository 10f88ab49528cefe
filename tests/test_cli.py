"""launch.py flags, their mapping onto Settings, settings precedence, and the checks before serving."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from studio import cli
from studio.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

ALL_FLAGS = [
    "--listen", "--port", "--api", "--nowebui", "--api-auth", "--gradio-auth", "--ckpt", "--ckpt-dir",
    "--vae-dir", "--lora-dir", "--embeddings-dir", "--controlnet-dir", "--models-dir", "--data-dir", "--outdir",
    "--device", "--precision", "--no-half-vae", "--medvram", "--lowvram", "--xformers", "--vram-budget",
    "--ram-budget", "--demo", "--test", "--skip-install", "--allow-download", "--reinstall-torch",
]


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_parser_accepts_every_flag(tmp_path):
    d = str(tmp_path)
    args = parse(
        "--listen", "--port", "7861", "--api", "--nowebui", "--api-auth", "a:b,c:d:e", "--gradio-auth", "u:p",
        "--ckpt", "model.safetensors", "--ckpt-dir", d, "--vae-dir", d, "--lora-dir", d, "--embeddings-dir", d,
        "--controlnet-dir", d, "--models-dir", d, "--data-dir", d, "--outdir", d, "--device", "cpu",
        "--precision", "fp16", "--no-half-vae", "--medvram", "--lowvram", "--xformers", "--vram-budget", "4000",
        "--ram-budget", "8000", "--demo", "--test", "--skip-install", "--allow-download",
    )
    assert args.port == 7861 and args.listen and args.api and args.nowebui
    assert args.api_auth == [("a", "b"), ("c", "d:e")]  # passwords may contain ':'
    assert args.gradio_auth == [("u", "p")]
    assert args.demo and args.test and args.skip_install and args.allow_download

    o = cli.settings_overrides(args)
    assert o == {
        "models_dir": d, "ckpt_dir": d, "vae_dir": d, "lora_dir": d, "embeddings_dir": d, "controlnet_dir": d,
        "data_dir": d, "outdir": d, "device": "cpu", "precision": "fp16", "no_half_vae": True,
        "offload": "lowvram", "xformers": True, "vram_budget_mb": 4000, "ram_budget_mb": 8000,
        "default_checkpoint": "model.safetensors", "allow_download": True,
    }
    # every override is a real Settings field of the right type
    settings = Settings(**o).validate()
    assert settings.offload == "lowvram" and settings.vram_budget_mb == 4000


def test_overrides_contain_only_given_flags():
    assert cli.settings_overrides(parse()) == {}
    assert cli.settings_overrides(parse("--port", "9000", "--listen", "--api", "--demo")) == {}
    assert cli.settings_overrides(parse("--device", "cpu")) == {"device": "cpu"}
    assert cli.settings_overrides(parse("--vram-budget", "0")) == {"vram_budget_mb": 0}


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    o = cli.settings_overrides(parse("--lora-dir", "loras", "--outdir", "~/out"))
    assert o["lora_dir"] == str(tmp_path / "loras")
    assert o["outdir"] == os.path.join(os.path.expanduser("~"), "out")
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert cli.settings_overrides(parse("--ckpt", "m.safetensors"))["default_checkpoint"] == \
        str(tmp_path / "m.safetensors")
    # a name that is not an existing file stays as given (file name in the checkpoint folder, or a repo id)
    assert cli.settings_overrides(parse("--ckpt", "org/repo"))["default_checkpoint"] == "org/repo"


@pytest.mark.parametrize("given, expected", [
    ("auto", "auto"), ("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("BF16", "bf16"),
    ("full", "fp32"), ("autocast", "auto"),
])
def test_precision_aliases(given, expected):
    assert cli.settings_overrides(parse("--precision", given))["precision"] == expected


def test_no_half_is_fp32_unless_precision_given():
    assert cli.settings_overrides(parse("--no-half"))["precision"] == "fp32"
    assert cli.settings_overrides(parse("--no-half", "--precision", "bf16"))["precision"] == "bf16"


def test_offload_flags():
    assert cli.settings_overrides(parse("--medvram"))["offload"] == "medvram"
    assert cli.settings_overrides(parse("--lowvram"))["offload"] == "lowvram"
    assert cli.settings_overrides(parse("--medvram", "--lowvram"))["offload"] == "lowvram"
    assert "offload" not in cli.settings_overrides(parse())


@pytest.mark.parametrize("argv, words", [
    (["--precision", "half-ish"], "precision"),
    (["--port", "99999"], "65535"),
    (["--port", "abc"], "port"),
    (["--vram-budget", "-1"], "negative"),
    (["--gradio-auth", "nopassword"], "user:password"),
    (["--no-such-flag"], "unrecognized"),
    (["--list"], "unrecognized"),  # no abbreviations of --listen
])
def test_bad_flags_exit_with_a_message(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_split_argv_passes_the_rest_to_pytest():
    assert cli.split_argv(["--test", "--", "-k", "cli"]) == (["--test"], ["-k", "cli"])
    assert cli.split_argv(["--port", "1"]) == (["--port", "1"], [])


def test_settings_precedence_defaults_file_cli(tmp_path):
    defaults = Settings()
    settings, messages = Settings.load(tmp_path, {})
    assert messages == []
    assert settings.device == defaults.device and settings.offload == "none"

    (tmp_path / "settings.json").write_text(json.dumps(
        {"device": "cpu", "offload": "medvram", "vram_budget_mb": 3000, "outdir": "/file/out"}))
    settings, _ = Settings.load(tmp_path, {})
    assert (settings.device, settings.offload, settings.vram_budget_mb) == ("cpu", "medvram", 3000)
    assert settings.precision == defaults.precision  # not in the file: default

    overrides = cli.settings_overrides(parse("--lowvram", "--precision", "full", "--data-dir", str(tmp_path)))
    settings, _ = Settings.load(tmp_path, overrides)
    assert settings.offload == "lowvram"          # CLI beats the file
    assert settings.precision == "fp32"           # CLI beats the default
    assert settings.device == "cpu"               # file kept where the CLI is silent
    assert settings.outdir == "/file/out"
    assert settings.data_dir == str(tmp_path)


def test_unreadable_settings_file_is_backed_up(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("{not json", encoding="utf-8")
    settings, messages = Settings.load(tmp_path, {"device": "cpu"})
    assert settings.offload == Settings().offload and settings.device == "cpu"
    assert len(messages) == 1 and "backed up" in messages[0] and str(path) in messages[0]
    backups = list(tmp_path.glob("settings.broken-*.json"))
    assert len(backups) == 1 and backups[0].read_text(encoding="utf-8") == "{not json"


def test_launch_help_lists_every_flag():
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--skip-install", "--help"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for flag in ALL_FLAGS:
        assert flag in result.stdout, flag


def test_cli_module_needs_no_heavy_imports():
    code = ("import sys; import studio.cli; "
            "print(sorted(m for m in ('torch', 'gradio', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def _listening_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_port_in_use_names_port_and_fix():
    sock = _listening_socket()
    try:
        port = sock.getsockname()[1]
        message = cli.check_port("127.0.0.1", port)
        assert message is not None
        assert f"Port {port}" in message and "already in use" in message and "--port " in message
    finally:
        sock.close()


def test_free_port_passes_the_check():
    sock = _listening_socket()
    port = sock.getsockname()[1]
    sock.close()
    assert cli.check_port("127.0.0.1", port) is None


def test_listen_without_auth_warns():
    assert cli.auth_warnings(parse()) == []
    assert cli.auth_warnings(parse("--listen", "--gradio-auth", "u:p")) == []
    warnings = cli.auth_warnings(parse("--listen"))
    assert len(warnings) == 1 and "--gradio-auth" in warnings[0]
    warnings = cli.auth_warnings(parse("--listen", "--api", "--gradio-auth", "u:p"))
    assert len(warnings) == 1 and "--api-auth" in warnings[0]
    assert len(cli.auth_warnings(parse("--listen", "--nowebui"))) == 1


# ---- launch.py helpers (stdlib-only module, imported by path) -----------------------------------
def _launch():
    spec = importlib.util.spec_from_file_location("_launch_under_test", ROOT / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_stamp(tmp_path, monkeypatch):
    launch = _launch()
    monkeypatch.setattr(launch.sys, "prefix", str(tmp_path))
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nfoo-bar==1.2  # why\nbaz==3.0\n\nqux>=1\n", encoding="utf-8")
    assert launch.pinned(req) == {"foo-bar": "1.2", "baz": "3.0"}
    versions = {"foo-bar": "1.2", "baz": "3.0"}
    assert not launch.is_current(req, versions)          # no stamp yet
    launch.write_stamp(req)
    assert launch.is_current(req, versions)              # stamp matches, pins installed
    assert not launch.is_current(req, {"foo-bar": "1.2", "baz": "2.9"})   # a package changed since
    req.write_text("foo-bar==1.3\nbaz==3.0\n", encoding="utf-8")
    assert not launch.is_current(req, {"foo-bar": "1.3", "baz": "3.0"})   # requirements changed


def test_project_requirements_are_pinned_and_installed():
    launch = _launch()
    versions = launch.installed_versions()
    for name in ("requirements.txt", "requirements-test.txt"):
        pins = launch.pinned(ROOT / name)
        assert pins, name
        lines = [l for l in (ROOT / name).read_text().splitlines() if l.strip() and not l.startswith("#")]
        assert len(lines) == len(pins), f"every line of {name} is an exact == pin"
        missing = {k: v for k, v in pins.items() if versions.get(k) != v}
        assert not missing, f"pinned but not installed at that version: {missing}"
    assert launch.pinned(ROOT / "requirements.txt")["torch"] == "2.14.1"


def test_deepcache_flag_and_settings():
    from studio import cli
    from studio.errors import StudioError
    from studio.settings import Settings
    args = cli.build_parser().parse_args(["--deepcache", "2"])
    assert cli.settings_overrides(args)["deepcache_interval"] == 2
    s, warnings = Settings.from_dict({"deepcache_interval": 3, "deepcache_start": 0})   # 0 as JSON writes it
    assert (s.deepcache_interval, s.deepcache_start, warnings) == (3, 0.0, [])
    for bad in ({"deepcache_interval": 0}, {"deepcache_start": 1.0}):
        with pytest.raises(StudioError) as e:
            Settings().replace(**bad)
        assert e.value.field == next(iter(bad))


def test_speed_flags_map_to_settings():
    from studio import cli
    from studio.errors import StudioError
    from studio.settings import Settings
    args = cli.build_parser().parse_args(["--queue-batch", "8", "--channels-last", "--sdpa-backend", "math",
                                          "--compile", "--vae-tiling", "--fused-qkv"])
    got = cli.settings_overrides(args)
    assert {k: got[k] for k in ("queue_batch", "channels_last", "sdpa_backend", "compile_backend", "vae_tiling",
                                "fused_qkv")} \
        == {"queue_batch": 8, "channels_last": True, "sdpa_backend": "math", "compile_backend": "inductor",
            "vae_tiling": True, "fused_qkv": True}
    assert cli.settings_overrides(cli.build_parser().parse_args(["--compile", "aot_eager"]))["compile_backend"] \
        == "aot_eager"
    for bad in ({"queue_batch": 0}, {"queue_batch": 65}, {"sdpa_backend": "fast"}):
        with pytest.raises(StudioError) as e:
            Settings().replace(**bad)
        assert e.value.field == next(iter(bad))
