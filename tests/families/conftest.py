"""A models/ tree of tiny FLUX.1 files (dev and schnell all-in-one, a diffusers folder) and a studio on it."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def flux_store(tmp_path_factory):
    from tests.tinyflux import make_tiny_flux, write_flux_folder, write_flux_single_file

    root = tmp_path_factory.mktemp("flux-store")
    ckpt = root / "Stable-diffusion"
    ckpt.mkdir()
    dev = make_tiny_flux(seed=1, guidance=True)
    write_flux_single_file(dev, ckpt / "flux1-dev-tiny.safetensors")
    write_flux_folder(dev, ckpt / "FLUX.1-dev-tiny")
    write_flux_single_file(make_tiny_flux(seed=2, guidance=False), ckpt / "flux1-schnell-tiny.safetensors")
    return root


@pytest.fixture()
def flux_studio(flux_store, tmp_path):
    from studio.app import Studio
    from studio.settings import Settings

    models = tmp_path / "models"
    shutil.copytree(flux_store, models)
    s = Studio(Settings(models_dir=str(models), data_dir=str(tmp_path / "data"), outdir=str(tmp_path / "outputs"),
                        default_checkpoint="flux1-dev-tiny.safetensors", preview_every=1))
    yield s
    s.close()
