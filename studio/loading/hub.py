"""Hugging Face repo ids as an optional source: resolved from the local cache unless downloads are allowed."""
from __future__ import annotations

import os

import torch

from ..errors import ModelLoadError
from .components import Components
from .diffusers_folder import load_diffusers_folder

# Only what a diffusers pipeline folder needs; skip legacy/duplicate weight formats and top-level single files.
IGNORE = ["*.ckpt", "*.bin", "*.msgpack", "*.onnx", "*.onnx_data", "*.pb", "*.h5", "*.fp16.*", "*.non_ema.*",
          "*.ema.*", "*.md", "*.png", "*.jpg"]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_repo(repo_id: str, allow_download: bool = False, *, revision: str | None = None,
                     cache_dir: str | None = None) -> str:
    """Local folder of ``repo_id`` (from the HF cache; downloaded only if allowed and online)."""
    from huggingface_hub import snapshot_download

    local_only = not allow_download or hub_offline()
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_only,
                                 ignore_patterns=IGNORE)
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, connection errors, ...
        if local_only:
            why = "downloads are off" if not allow_download else "the studio is offline (HF_HUB_OFFLINE)"
            raise ModelLoadError(f"{repo_id} is not in the Hugging Face cache and {why}.", path=repo_id,
                                 fix="download it on a machine with internet (huggingface-cli download "
                                     f"{repo_id}) and copy the cache, or set allow_download.") from e
        raise ModelLoadError(f"Could not download {repo_id} ({type(e).__name__}: {str(e)[:200]}).", path=repo_id,
                             fix="check the repo id and your connection, or download it manually.") from e


def load_hub_repo(repo_id: str, allow_download: bool = False, *, dtype=torch.float32, device="cpu",
                  revision: str | None = None, cache_dir: str | None = None) -> Components:
    """A diffusers repo id -> Components (via the local HF cache)."""
    folder = resolve_hub_repo(repo_id, allow_download, revision=revision, cache_dir=cache_dir)
    comps = load_diffusers_folder(folder, dtype=dtype, device=device)
    comps.source = repo_id
    return comps
