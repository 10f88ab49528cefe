"""Command-line flags of ``launch.py`` (AUTOMATIC1111 names) and their mapping onto ``Settings`` fields.

Standard library only, and no relative imports: ``launch.py`` loads this file by path before the virtual
environment exists (``python launch.py --help`` works on a bare Python).
"""
from __future__ import annotations

import argparse
import os
import socket

DEFAULT_PORT = 7860
DEFAULT_DATA_DIR = "data"

# --precision values; A1111's own spellings are aliases
PRECISION_ALIASES = {"full": "fp32", "autocast": "auto", "half": "fp16"}
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")

# flag dest -> Settings field, for flags that map one-to-one
_DIRECT = {
    "models_dir": "models_dir",
    "ckpt_dir": "ckpt_dir",
    "vae_dir": "vae_dir",
    "lora_dir": "lora_dir",
    "embeddings_dir": "embeddings_dir",
    "controlnet_dir": "controlnet_dir",
    "text_encoder_dir": "text_encoder_dir",
    "data_dir": "data_dir",
    "outdir": "outdir",
    "device": "device",
    "no_half_vae": "no_half_vae",
    "xformers": "xformers",
    "vram_budget": "vram_budget_mb",
    "ram_budget": "ram_budget_mb",
    "quantize": "quantize",
    "deepcache": "deepcache_interval",
    "queue_batch": "queue_batch",
    "channels_last": "channels_last",
    "fused_qkv": "fused_qkv",
    "sdpa_backend": "sdpa_backend",
    "compile": "compile_backend",
    "vae_tiling": "vae_tiling",
    "onnx": "onnx_runtime",
    "allow_download": "allow_download",
}


# ---- argument types ------------------------------------------------------------------------------
def _path(text: str) -> str:
    """A folder given on the command line, made absolute against the current directory.

    launch.py changes into its own folder afterwards, so a relative path must be resolved first.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path was given")
    return os.path.abspath(os.path.expanduser(text))


def _checkpoint(text: str) -> str:
    """--ckpt: a file path (made absolute when it exists), a file name in the checkpoint folder, or a repo id."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty checkpoint name was given")
    expanded = os.path.expanduser(text)
    return os.path.abspath(expanded) if os.path.exists(expanded) else text


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (use e.g. --port 7861)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def _megabytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of megabytes (e.g. 6000)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} MB is negative (0 means: derive from free memory)")
    return value


def _precision(text: str) -> str:
    value = text.strip().lower()
    value = PRECISION_ALIASES.get(value, value)
    if value not in PRECISION_CHOICES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a precision; use one of {', '.join(PRECISION_CHOICES)} "
            f"(A1111's 'full' means fp32, 'autocast' means auto)")
    return value


def parse_auth(text: str) -> list[tuple[str, str]]:
    """``user:pass[,user2:pass2]`` -> [(user, pass), ...]. Passwords may contain ':'."""
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not user:password (several accounts: user1:pass1,user2:pass2)")
        pairs.append((user, password))
    if not pairs:
        raise argparse.ArgumentTypeError("no user:password given")
    return pairs


# ---- the parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """All flags. Flags the user does not give stay ``None`` so they do not override the settings file."""
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="The studio: a local Stable Diffusion studio (AUTOMATIC1111-style flags). "
                    "Without a virtual environment it creates .venv, installs requirements.txt there and "
                    "re-runs itself inside it.",
        epilog="Settings persist in <data-dir>/settings.json; flags given here override that file for this "
               "run. Arguments after '--' are passed to pytest with --test.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("server")
    g.add_argument("--listen", action="store_true", default=None,
                   help="listen on 0.0.0.0 (reachable from the network) instead of 127.0.0.1")
    g.add_argument("--port", type=_port, default=None, metavar="N",
                   help=f"port of the web UI and API (default {DEFAULT_PORT})")
    g.add_argument("--api", action="store_true", default=None,
                   help="also serve the A1111-compatible REST API (/sdapi/v1/*)")
    g.add_argument("--nowebui", action="store_true", default=None,
                   help="serve only the REST API, no web UI (implies --api)")
    g.add_argument("--api-auth", type=parse_auth, default=None, metavar="USER:PASS[,USER2:PASS2]",
                   help="HTTP basic auth for the API")
    g.add_argument("--gradio-auth", type=parse_auth, default=None, metavar="USER:PASS[,USER2:PASS2]",
                   help="login for the web UI")

    g = p.add_argument_group("models and folders")
    g.add_argument("--ckpt", type=_checkpoint, default=None, metavar="FILE",
                   help="checkpoint to load at start (path, or file name in the checkpoint folder)")
    g.add_argument("--models-dir", type=_path, default=None, metavar="DIR",
                   help="base models folder holding Stable-diffusion/ VAE/ Lora/ embeddings/ ControlNet/ "
                        "(default: models)")
    g.add_argument("--ckpt-dir", type=_path, default=None, metavar="DIR",
                   help="checkpoint folder (default: <models-dir>/Stable-diffusion)")
    g.add_argument("--vae-dir", type=_path, default=None, metavar="DIR",
                   help="VAE folder (default: <models-dir>/VAE)")
    g.add_argument("--lora-dir", type=_path, default=None, metavar="DIR",
                   help="LoRA folder (default: <models-dir>/Lora)")
    g.add_argument("--embeddings-dir", type=_path, default=None, metavar="DIR",
                   help="textual-inversion embeddings folder (default: <models-dir>/embeddings)")
    g.add_argument("--controlnet-dir", type=_path, default=None, metavar="DIR",
                   help="ControlNet folder (default: <models-dir>/ControlNet)")
    g.add_argument("--text-encoder-dir", type=_path, default=None, metavar="DIR",
                   help="separate text-encoder files: clip_l, t5xxl (default: <models-dir>/text_encoder, "
                        "then ComfyUI's text_encoders/ and clip/)")
    g.add_argument("--data-dir", type=_path, default=None, metavar="DIR",
                   help=f"where settings.json and caches live (default: {DEFAULT_DATA_DIR})")
    g.add_argument("--outdir", type=_path, default=None, metavar="DIR",
                   help="output folder for generated images (default: outputs)")

    g = p.add_argument_group("device and memory")
    g.add_argument("--device", default=None, metavar="DEVICE",
                   help="auto, cuda, cuda:N, mps or cpu (default: auto)")
    g.add_argument("--precision", type=_precision, default=None, metavar="P",
                   help="auto, fp32, fp16 or bf16 (A1111's 'full' = fp32, 'autocast' = auto)")
    g.add_argument("--no-half", action="store_true", default=None,
                   help="A1111 spelling of --precision fp32 (ignored when --precision is given)")
    g.add_argument("--no-half-vae", action="store_true", default=None,
                   help="keep the VAE in fp32 (avoids black images with some fp16 VAEs)")
    g.add_argument("--medvram", action="store_true", default=None,
                   help="offload idle model parts to RAM (less VRAM, a little slower)")
    g.add_argument("--lowvram", action="store_true", default=None,
                   help="offload layer by layer (least VRAM, slow); wins over --medvram")
    g.add_argument("--xformers", action="store_true", default=None,
                   help="use xformers attention; installed only when CUDA is available (a failed install or a "
                        "build that does not work on this GPU falls back to PyTorch's attention with a warning)")
    g.add_argument("--vram-budget", type=_megabytes, default=None, metavar="MB",
                   help="device memory the model cache may use (default 0: derived from free memory)")
    g.add_argument("--ram-budget", type=_megabytes, default=None, metavar="MB",
                   help="system RAM the model cache may use (default 0: derived from system RAM)")
    g.add_argument("--quantize", choices=("none", "int8", "fp8"), default=None,
                   help="keep weights quantised: int8 (weight-only, any device: the linear layers at a quarter of "
                        "fp32 / half of fp16, not faster, pictures change a little) or fp8 (storage on CUDA); "
                        "default none")
    g.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help="DeepCache: run the whole UNet every N-th step and only its outer blocks between "
                        "(default 1: off; 2-3 is about 1.5x faster and changes the picture a little)")
    g.add_argument("--queue-batch", type=int, default=None, metavar="N",
                   help="dynamic batching: up to N images of compatible txt2img jobs waiting in the queue (same "
                        "model, size, steps, sampler, LoRAs) run as one batch, each with its own seed and result "
                        "(default 1: each job alone)")
    g.add_argument("--channels-last", action="store_true", default=None,
                   help="keep UNets in channels_last memory format (faster convolutions on NVIDIA tensor cores)")
    g.add_argument("--fused-qkv", action="store_true", default=None,
                   help="fuse attention's q / k / v projections into one matmul (diffusers' fuse_qkv_projections; "
                        "rebuilt when a LoRA set changes them)")
    # settings.SDPA_BACKENDS, written out: launch.py reads this file on its own, before the package imports
    g.add_argument("--sdpa-backend", choices=("auto", "flash", "efficient", "cudnn", "math"), default=None,
                   help="the attention kernel PyTorch's scaled_dot_product_attention may use (default auto)")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the UNet / transformer (default backend inductor); each new image size "
                        "compiles once, later jobs at that size reuse it")
    g.add_argument("--vae-tiling", action="store_true", default=None,
                   help="decode and encode large images in tiles (less memory; seams are blended)")
    g.add_argument("--onnx", action="store_true", default=None,
                   help="run the UNet and VAE on onnxruntime from the checkpoint's ONNX export (Settings or POST "
                        "/sdapi/v1/export/onnx makes it; CUDA / TensorRT providers when installed, else the CPU); "
                        "pictures differ slightly from torch's; LoRA prompts run on torch")

    g = p.add_argument_group("setup and modes")
    g.add_argument("--demo", action="store_true", default=None,
                   help="install the demo model (a 24.5 MB toy trained to draw one coloured shape on a plain "
                        "background, 64 px) and use it when no checkpoint is set; works offline")
    g.add_argument("--test", action="store_true", default=None,
                   help="install test requirements too and run the test suite (pytest), then exit")
    g.add_argument("--train", default=None, metavar="RUN.TOML",
                   help="run a training config (as the Train tab writes it) with a console progress bar, then exit")
    g.add_argument("--reinstall-torch", action="store_true", default=None,
                   help="reinstall torch and torchvision (the CUDA build when nvidia-smi finds an NVIDIA GPU, or "
                        "from $TORCH_INDEX_URL), e.g. after a CPU-only torch was installed")
    g.add_argument("--skip-install", action="store_true", default=None,
                   help="do not create .venv or install requirements")
    g.add_argument("--allow-download", action="store_true", default=None,
                   help="allow Hugging Face downloads (by default the studio runs offline)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split at the first ``--``: (launch.py flags, extra arguments for pytest)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return list(argv), []


def settings_overrides(args: argparse.Namespace) -> dict:
    """Only the Settings fields the user actually gave on the command line."""
    out: dict = {}
    for dest, name in _DIRECT.items():
        value = getattr(args, dest, None)
        if value is not None:
            out[name] = value
    if getattr(args, "ckpt", None) is not None:
        out["default_checkpoint"] = args.ckpt
    if getattr(args, "precision", None) is not None:
        out["precision"] = args.precision
    elif getattr(args, "no_half", None):
        out["precision"] = "fp32"
    if getattr(args, "lowvram", None):
        out["offload"] = "lowvram"
    elif getattr(args, "medvram", None):
        out["offload"] = "medvram"
    return out


# ---- checks before serving -----------------------------------------------------------------------
def host_for(args: argparse.Namespace) -> str:
    return "0.0.0.0" if getattr(args, "listen", None) else "127.0.0.1"


def port_for(args: argparse.Namespace) -> int:
    return getattr(args, "port", None) or DEFAULT_PORT


def _can_bind(host: str, port: int) -> bool:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if os.name != "nt":  # like uvicorn: a port in TIME_WAIT after a restart is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def check_port(host: str, port: int) -> str | None:
    """None when ``host:port`` can be bound, else a message naming the port and the fix."""
    if _can_bind(host, port):
        return None
    free = next((p for p in range(port + 1, min(port + 50, 65536)) if _can_bind(host, p)), None)
    fix = f"start with --port {free}" if free else "start with --port N using a free port"
    return (f"Port {port} on {host} is already in use (another studio or A1111 may be running). "
            f"Fix: stop that program, or {fix}.")


def auth_warnings(args: argparse.Namespace) -> list[str]:
    """Warnings for a server reachable from the network without a password."""
    if not getattr(args, "listen", None):
        return []
    out = []
    ui = not getattr(args, "nowebui", None)
    api = bool(getattr(args, "api", None) or getattr(args, "nowebui", None))
    if ui and not getattr(args, "gradio_auth", None):
        out.append("WARNING: --listen makes the web UI reachable from your network without a password. "
                   "Add --gradio-auth user:password to require a login.")
    if api and not getattr(args, "api_auth", None):
        out.append("WARNING: --listen makes the API reachable from your network without a password. "
                   "Add --api-auth user:password to require credentials.")
    return out
