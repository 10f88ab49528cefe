"""Training fixtures: a tiny SD1 checkpoint in an A1111 models/ tree and synthetic coloured-shape images."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ((220, 40, 40), (40, 200, 60), (40, 80, 230), (230, 200, 40))


def make_shape(kind: str, colour, size=(64, 64), bg=(245, 245, 240)):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    w, h = size
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    if kind == "circle":
        d.ellipse(box, fill=colour)
    elif kind == "square":
        d.rectangle(box, fill=colour)
    elif kind == "triangle":
        d.polygon([(w / 2, h * 0.15), (w * 0.85, h * 0.85), (w * 0.15, h * 0.85)], fill=colour)
    else:
        d.rectangle((w * 0.4, h * 0.1, w * 0.6, h * 0.9), fill=colour)
        d.rectangle((w * 0.1, h * 0.4, w * 0.9, h * 0.6), fill=colour)
    return im


def write_dataset(folder: Path, n: int = 4, sizes=None, captions: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = sizes[i] if sizes else (64, 64)
        kind, colour = SHAPES[i % 4], COLOURS[i % 4]
        make_shape(kind, colour, size).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"shp, a {kind}, plain background\n")
    return folder


@pytest.fixture(scope="session")
def train_store(tmp_path_factory) -> Path:
    """models/ with one tiny SD1 single-file checkpoint (written once per session)."""
    from tests import tinymodels
    root = tmp_path_factory.mktemp("trainstore") / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=0), root / "Stable-diffusion" / "tiny-sd1.safetensors")
    return root


@pytest.fixture()
def tmodels(train_store, tmp_path) -> Path:
    dst = tmp_path / "train-models" / "models"
    shutil.copytree(train_store, dst)
    return dst


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "dataset", 4)


@pytest.fixture()
def make_cfg(tmodels, dataset, tmp_path):
    from studio.training import TrainConfig

    def make(**kw):
        base = dict(base_model=str(tmodels / "Stable-diffusion" / "tiny-sd1.safetensors"), dataset_dir=str(dataset),
                    resolution=64, min_bucket_reso=64, max_bucket_reso=128, min_image_side=32, rank=4, alpha=4.0,
                    learning_rate=1e-3, max_steps=6, batch_size=2, seed=1, sample_steps=2, output_name="shp",
                    run_dir=str(tmp_path / "run"))
        base.update(kw)
        return TrainConfig(**base)
    return make


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: starts several training processes (torchrun, gloo on the CPU)")
