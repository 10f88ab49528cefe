#!/usr/bin/env python3
"""Entry point of the studio.

    python launch.py            set up .venv (first run), then serve the studio at http://127.0.0.1:7860
    python launch.py --test     the same setup plus test requirements, then run the test suite

Only the standard library is imported at module level: this file runs on a bare Python before the virtual
environment exists. Outside a virtual environment it creates ``.venv`` next to this file and re-executes itself
with that environment's Python; inside one it installs whatever requirements are missing. An install stamp in the
environment (hash of the requirements file + Python version) makes re-runs skip pip.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = ROOT / "requirements.txt"
REQUIREMENTS_TEST = ROOT / "requirements-test.txt"
REEXEC_ENV = "STUDIO_LAUNCH_REEXEC"
STAMP_PREFIX = ".studio-install-"
# The pinned torch's CUDA build: PyPI's Linux wheel of torch 2.14.1 is this one (torch.version.cuda "13.0"); PyPI's
# Windows wheel is CPU-only, so on Windows (and for consistency on Linux) a GPU gets it from PyTorch's own index.
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu130"
TORCH_CUDA_MIN_DRIVER = 580          # CUDA 13.0 needs an R580+ NVIDIA driver
TORCH_INDEX_ENV = "TORCH_INDEX_URL"  # A1111's name: the index torch / torchvision / xformers come from


def say(message: str) -> None:
    print(f"[studio] {message}", flush=True)


def _load_by_path(name: str):
    """A stdlib-only file of studio/ loaded by path: importing the ``studio`` package may need the venv."""
    spec = importlib.util.spec_from_file_location(f"_studio_{name}", ROOT / "studio" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # registered before it runs, as an import would: dataclasses look their module up in sys.modules
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_cli():
    return _load_by_path("cli")


# ---- virtual environment ------------------------------------------------------------------------
def in_venv() -> bool:
    return sys.prefix != sys.base_prefix


def venv_python(venv: Path = VENV) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def create_venv(venv: Path = VENV) -> None:
    say(f"Creating the virtual environment {venv} ...")
    result = subprocess.run([sys.executable, "-m", "venv", str(venv)])
    if result.returncode != 0 or not venv_python(venv).exists():
        shutil.rmtree(venv, ignore_errors=True)
        raise SystemExit(
            f"[studio] Could not create {venv} with {sys.executable} -m venv. "
            "Fix: install the venv module (Debian/Ubuntu: apt-get install python3-venv), or create and activate "
            "a virtual environment yourself and run launch.py inside it.")


def reexec_in_venv(argv: list[str]) -> None:
    """Replace this process with launch.py running under the .venv Python (same arguments)."""
    if os.environ.get(REEXEC_ENV):
        raise SystemExit(f"[studio] {venv_python()} did not start as a virtual environment. "
                         f"Fix: delete {VENV} and run launch.py again.")
    python = str(venv_python())
    os.environ[REEXEC_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(python, [python, str(ROOT / "launch.py"), *argv])


# ---- requirements and the install stamp ---------------------------------------------------------
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def pinned(requirements: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, names normalised (PEP 503)."""
    pins = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        m = _PIN.match(line)
        if m:
            pins[_normalise(m.group(1))] = m.group(2)
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    from importlib import metadata
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_normalise(name), dist.version)
    return out


def stamp_path(requirements: Path, prefix: str | None = None) -> Path:
    # extensions' files are all called requirements.txt: their stamps are named after their folder
    name = requirements.name if requirements.parent == ROOT else f"ext-{requirements.parent.name}-{requirements.name}"
    return Path(prefix or sys.prefix) / f"{STAMP_PREFIX}{name}.json"


def stamp_value(requirements: Path) -> dict:
    """What the environment must have been installed from: the file's hash and this Python's version."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    return {"requirements": requirements.name, "sha256": digest, "python": sys.version}


def is_current(requirements: Path, versions: dict[str, str] | None = None) -> bool:
    """True when the stamp matches and every pinned package is installed at its pinned version."""
    try:
        stamp = json.loads(stamp_path(requirements).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if stamp != stamp_value(requirements):
        return False
    versions = installed_versions() if versions is None else versions
    return all(versions.get(name) == version for name, version in pinned(requirements).items())


def write_stamp(requirements: Path) -> None:
    path = stamp_path(requirements)
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stamp_value(requirements), indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # e.g. a read-only environment: we simply check again next time
        say(f"Note: could not write the install stamp {path} ({exc}); the next start checks with pip again.")


def pip_install(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    if not sys.stdout.isatty():
        cmd.insert(4, "--progress-bar=off")
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise SystemExit(f"[studio] pip failed (exit code {result.returncode}) running: {' '.join(cmd)}\n"
                         "[studio] Fix: read pip's message above (network, disk space, Python version); "
                         "then run launch.py again.")


def install_requirements(files: list[Path], *pip_args: str, what: str = "Requirements") -> None:
    todo = [f for f in files if f.exists() and not is_current(f)]
    if not todo:
        say(f"{what} are installed (install stamp matches); skipping pip.")
        return
    started = time.monotonic()
    args = list(pip_args)
    for f in todo:
        args += ["-r", str(f)]
    say(f"Installing {', '.join(str(f.relative_to(ROOT)) if ROOT in f.parents else f.name for f in todo)} "
        f"into {sys.prefix} ...")
    pip_install(*args)
    for f in todo:
        write_stamp(f)
    say(f"Requirements installed in {time.monotonic() - started:.0f} s.")


def extension_requirements(args) -> list[Path]:
    """requirements.txt of each ENABLED extension, found from their folders and data/extensions.json alone
    (declarative: no extension code runs at install time)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from studio.errors import StudioError
    from studio.extensions import ExtensionManager
    from studio.settings import Settings

    cli = load_cli()
    overrides = cli.settings_overrides(args)
    data_dir = ROOT / overrides.get("data_dir", cli.DEFAULT_DATA_DIR)
    try:
        settings, _ = Settings.load(data_dir, overrides)
    except StudioError:
        return []  # serve() reports the bad settings
    manager = ExtensionManager([ROOT / settings.extensions_dir], data_dir / "extensions.json")
    return manager.requirements_files()


def install_extension_requirements(args) -> None:
    """One pip run per extension, constrained by the studio's pins (an extension cannot move torch); a failing
    extension is reported and the studio still starts (the extension then fails to import and says so)."""
    for requirements in extension_requirements(args):
        try:
            install_requirements([requirements], "-c", str(REQUIREMENTS),
                                 what=f"Requirements of extension {requirements.parent.name}")
        except SystemExit as exc:
            say(f"Extension {requirements.parent.name}: its requirements could not be installed; it may fail to "
                f"load. {exc}")


# ---- torch: the wheel for this machine ----------------------------------------------------------
NO_TORCH = "absent"   # installed_torch_cuda() when torch is not installed at all


def installed_torch_cuda() -> str | None:
    """``torch.version.cuda`` of the installed torch (None: a CPU build; NO_TORCH: not installed), read from its
    version.py: importing torch here would take seconds and could load a broken build."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return NO_TORCH
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text(encoding="utf-8")
    except OSError:
        return NO_TORCH
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None


def torch_index(system: str, gpus: list, env: dict) -> tuple[str | None, str]:
    """(extra index URL for torch, or None for PyPI's default; why). ``system`` is platform.system()."""
    override = env.get(TORCH_INDEX_ENV, "").strip()
    if override:
        return override, f"{TORCH_INDEX_ENV} is set"
    if system == "Darwin":
        return None, "macOS: PyPI's torch (Apple GPUs through MPS)"
    if not gpus:
        return None, "no NVIDIA GPU found by nvidia-smi: PyPI's default torch"
    if system in ("Windows", "Linux"):
        return TORCH_CUDA_INDEX, f"NVIDIA GPU {gpus[0].name}: torch's CUDA build"
    return None, f"{system}: PyPI's default torch"


def torch_step(system: str, gpus: list, env: dict, installed_version: str | None, installed_cuda: str | None,
               pins: dict, force: bool = False) -> tuple[list[str] | None, list[str]]:
    """The pip arguments that install torch + torchvision for this machine (None: nothing to do) and the notes
    to show. Pure: the caller gathers platform, nvidia-smi's GPUs, the environment and what is installed.

    torch goes first and alone because ``-r requirements.txt`` would take it from PyPI's default index, which on
    Windows has only CPU wheels; once the right build is in, the requirements step sees the pin satisfied.
    """
    index, why = torch_index(system, gpus, env)
    notes = []
    cpu_build = installed_cuda is None
    wants_cuda = index is not None and "/cpu" not in index
    if force:
        reinstall, reason = True, "--reinstall-torch"
    elif installed_cuda == NO_TORCH or installed_version is None:
        reinstall, reason = False, "torch is not installed"
    elif installed_version.split("+")[0] != pins.get("torch"):
        reinstall, reason = False, f"torch {installed_version} is installed, {pins.get('torch')} is pinned"
    elif cpu_build and wants_cuda and gpus:
        reinstall, reason = True, f"torch {installed_version} is a CPU build but {gpus[0].name} is present"
    else:
        return None, notes
    if gpus and index == TORCH_CUDA_INDEX and 0 < gpus[0].driver_major < TORCH_CUDA_MIN_DRIVER:
        notes.append(f"Note: NVIDIA driver {gpus[0].driver} is older than CUDA 13.0 needs "
                     f"({TORCH_CUDA_MIN_DRIVER}+); torch will not see the GPU. Fix: update the driver, or set "
                     f"{TORCH_INDEX_ENV} to an older CUDA build (https://download.pytorch.org/whl/cuXYZ) and run "
                     "python launch.py --reinstall-torch.")
    args = [f"torch=={pins['torch']}", f"torchvision=={pins['torchvision']}", "-c", str(REQUIREMENTS)]
    if index:
        args += ["--extra-index-url", index]
    if reinstall:
        args.append("--force-reinstall")
    notes.insert(0, f"Installing torch {pins['torch']} ({reason}; {why}"
                    f"{', from ' + index if index else ''}) ...")
    return args, notes


def install_torch(force: bool = False) -> None:
    """Put the torch build that fits this machine in place (fast no-op when it is there)."""
    import platform
    from importlib import metadata

    pins = pinned(REQUIREMENTS)
    if "torch" not in pins or "torchvision" not in pins:
        return
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        version = None
    cuda = installed_torch_cuda()
    system = platform.system()
    if not force and version and version.split("+")[0] == pins["torch"] and cuda not in (None, NO_TORCH):
        return  # a CUDA build at the pinned version: nothing to ask nvidia-smi
    gpus = [] if system == "Darwin" else _load_by_path("nvidia").nvidia_gpus()
    args, notes = torch_step(system, gpus, dict(os.environ), version, cuda, pins, force=force)
    for note in notes:
        say(note)
    if args is not None:
        pip_install(*args)


def install_xformers() -> None:
    """xformers is optional: it only has wheels for CUDA builds of torch, and a failed install is a warning (the
    studio then uses PyTorch's own attention; at first use it also checks that an installed xformers works)."""
    if "xformers" in installed_versions():
        return
    import torch  # installed by now
    if not torch.cuda.is_available():
        say("Note: --xformers ignored: no CUDA device (torch.cuda.is_available() is False); "
            "xformers is not installed and PyTorch's own attention is used.")
        return
    import platform
    index = os.environ.get(TORCH_INDEX_ENV, "").strip() or (
        TORCH_CUDA_INDEX if platform.system() in ("Windows", "Linux") else None)
    say("Installing xformers for CUDA ...")
    try:
        pip_install(*xformers_args(index))
    except SystemExit as exc:
        say(f"WARNING: xformers could not be installed; the studio starts with PyTorch's own attention. {exc}")


def xformers_args(index: str | None) -> list[str]:
    """pip arguments for xformers: constrained by the pins so it can never move torch."""
    return ["xformers", "-c", str(REQUIREMENTS)] + (["--extra-index-url", index] if index else [])


def ensure_chromium() -> None:
    """Browser tests use Debian's chromium (never `playwright install`)."""
    if Path("/usr/bin/chromium").exists():
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        say("Note: /usr/bin/chromium is missing and apt-get cannot be run here (needs root on Debian/Ubuntu); "
            "browser tests will be skipped. Fix: sudo apt-get install chromium chromium-driver")
        return
    say("Installing chromium and chromium-driver with apt-get for the browser tests ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    ok = subprocess.run(["apt-get", "update", "-q"], env=env, stdin=subprocess.DEVNULL).returncode == 0
    ok = ok and subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium",
                                "chromium-driver"], env=env, stdin=subprocess.DEVNULL).returncode == 0
    if not ok or not Path("/usr/bin/chromium").exists():
        say("Note: installing chromium failed; browser tests will be skipped.")


def setup_environment(args, argv: list[str]) -> None:
    """Create/enter .venv and install what is missing (no-op with --skip-install)."""
    if not in_venv():
        if not args.skip_install and not venv_python().exists():
            create_venv()
        if venv_python().exists():
            reexec_in_venv(argv)  # does not return
        say("Note: not in a virtual environment and --skip-install given; using "
            f"{sys.executable} as it is.")
        return
    if args.skip_install:
        return
    files = [REQUIREMENTS] + ([REQUIREMENTS_TEST] if args.test else [])
    install_torch(force=bool(getattr(args, "reinstall_torch", None)))
    install_requirements(files)
    install_extension_requirements(args)
    if args.xformers:
        install_xformers()


# ---- modes --------------------------------------------------------------------------------------
def base_env(allow_download: bool) -> None:
    if not allow_download:
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def test_workers(extra: list[str]) -> list[str]:
    """pytest-xdist arguments: two workers, each taking whole test files (a file's module fixtures, such as the
    trained LoRAs of the concept tests, are built once). Many tests wait on a browser, a server or a trainer
    subprocess, so two workers finish the suite in about 0.6 of the time of one even on two cores. None when the
    caller chose (``-n`` / ``-p no:xdist`` after ``--``) or the machine has a single core."""
    if any(a == "-n" or a.startswith(("-n=", "--numprocesses")) or a == "no:xdist" for a in extra):
        return []
    if (os.cpu_count() or 1) < 2:
        return []
    return ["-n", "2", "--dist", "loadfile"]


def run_tests(extra: list[str]) -> int:
    ensure_chromium()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-x", "--durations=15", *test_workers(extra), *extra]
    say("Running: " + " ".join(cmd[1:]))
    started = time.monotonic()
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    took = time.monotonic() - started
    if code == 0:
        say(f"TESTS PASSED in {took:.0f} s.")
    elif code == 5:
        say(f"TESTS BROKEN: pytest collected no tests from {ROOT / 'tests'} ({took:.0f} s). An empty test "
            "suite means a broken checkout. Fix: check that tests/ holds test_*.py files and that the "
            "arguments after -- select some.")
        code = 1
    else:
        say(f"TESTS FAILED (pytest exit code {code}) in {took:.0f} s.")
    return code


def serve(args, cli) -> int:
    from studio.errors import StudioError
    from studio.settings import Settings

    base_env(bool(args.allow_download))
    overrides = cli.settings_overrides(args)
    data_dir = overrides.get("data_dir", cli.DEFAULT_DATA_DIR)
    try:
        settings, messages = Settings.load(data_dir, overrides)
    except StudioError as exc:
        say(f"Error: {exc}")
        return 2
    for message in messages:
        say(message)

    host, port = cli.host_for(args), cli.port_for(args)
    problem = cli.check_port(host, port)
    if problem:
        say(problem)
        return 1
    for warning in cli.auth_warnings(args):
        say(warning)
    args.host, args.port = host, port  # resolved for the server
    if args.nowebui:
        args.api = True

    if args.demo:
        from studio.demo import TRAINED_NAME, demo_summary, install_demo_model
        made = install_demo_model(settings)
        say(f"Demo model ({demo_summary()}; try \"a red circle on a blue background\"): {made}")
        if not settings.default_checkpoint:
            settings = settings.replace(default_checkpoint=TRAINED_NAME)

    from webui.server import serve as serve_studio
    result = serve_studio(settings, args)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = load_cli()
    own, extra = cli.split_argv(argv)
    args = cli.build_parser().parse_args(own)  # --help and bad flags exit here, before any install
    if extra and not args.test:
        say(f"Note: arguments after -- are for --test (pytest) and are ignored here: {' '.join(extra)}")

    setup_environment(args, argv)
    os.chdir(ROOT)  # default folders (models/, outputs/, data/) are relative to the project
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.test:
        return run_tests(extra)
    if args.train:
        base_env(bool(args.allow_download))
        from studio.training import cli_main
        return cli_main([args.train])
    return serve(args, cli)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(flush=True)
        sys.exit(130)
