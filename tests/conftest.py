"""Shared fixtures: tiny models written once per session in the formats users bring."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A models/ tree with tiny checkpoints: SD1 (file, second file, diffusers folder), SD2 (file), SDXL (file)."""
    from tests import tinymodels

    root = tmp_path_factory.mktemp("store")
    ckpt = root / "Stable-diffusion"
    (ckpt / "sub").mkdir(parents=True)
    sd1 = tinymodels.make_tiny("sd1", seed=0)
    tinymodels.write_single_file(sd1, ckpt / "tiny-sd1.safetensors")
    tinymodels.write_diffusers_folder(sd1, ckpt / "tiny-sd1-diffusers")
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=1), ckpt / "tiny-sd1-b.safetensors")
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=2), ckpt / "sub" / "tiny-sd1-c.safetensors")
    tinymodels.write_single_file(tinymodels.make_tiny("sd2", seed=3), ckpt / "tiny-sd2.safetensors")
    tinymodels.write_single_file(tinymodels.make_tiny("sdxl", seed=4), ckpt / "tiny-sdxl.safetensors")
    (root / "VAE").mkdir()
    from studio.loading.ldm_export import vae_to_ldm
    from safetensors.torch import save_file
    vae = tinymodels.make_tiny("sd1", seed=5).vae
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), prefix="").items()}, str(root / "VAE" / "tiny-vae.safetensors"))
    return root


@pytest.fixture()
def models_dir(model_store, tmp_path) -> Path:
    """A private copy of the store (tests may add, corrupt or delete files in it)."""
    dst = tmp_path / "models"
    shutil.copytree(model_store, dst)
    return dst


@pytest.fixture()
def settings(models_dir, tmp_path):
    from studio.settings import Settings

    return Settings(models_dir=str(models_dir), data_dir=str(tmp_path / "data"), outdir=str(tmp_path / "outputs"),
                    default_checkpoint="tiny-sd1.safetensors", preview_every=1)


@pytest.fixture()
def studio(settings):
    from studio.app import Studio

    s = Studio(settings)
    yield s
    s.close()
