"""ControlNet training (method "controlnet"): conditions from a preprocessor or from pairs, the files it writes,
exact resume, samples with their condition, and the bad datasets refused before anything starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.training.conftest import write_dataset


def _pairs(folder: Path, n: int = 4) -> Path:
    """The dataset plus ``conditioning/imgN.png``: each image's own edge map, the diffusers example's layout."""
    import cv2
    import numpy as np
    write_dataset(folder, n)
    (folder / "conditioning").mkdir()
    for i in range(n):
        grey = np.asarray(Image.open(folder / f"img{i}.png").convert("L"))
        Image.fromarray(cv2.Canny(grey, 100, 200)).convert("RGB").save(folder / "conditioning" / f"img{i}.png")
    return folder


@pytest.fixture()
def cn_cfg(make_cfg, tmp_path):
    def make(**kw):
        return make_cfg(**{"method": "controlnet", "conditioning": "folder", "dataset_dir": str(_pairs(
            tmp_path / "pairs")) if not (tmp_path / "pairs").exists() else str(tmp_path / "pairs"),
            "output_name": "cn", "max_steps": 4, "learning_rate": 1e-3, **kw})
    return make


def test_pairs_train_a_controlnet_in_every_layout(cn_cfg, tmp_path):
    """lllyasviel single file (the studio's loader, diffusers' from_single_file) and a diffusers folder, all three
    the same weights; metadata says base model, condition and steps; conditioning/ is never a training image."""
    from diffusers import ControlNetModel
    from safetensors import safe_open

    from studio.controlnet.models import load_controlnet
    from studio.training.trainer import Trainer
    cfg = cn_cfg()
    result = Trainer(cfg).run()
    assert result.steps == 4 and result.output.parent.name == "ControlNet"
    with safe_open(str(result.output), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("control_model.") for k in keys)
    assert any(k.startswith("control_model.input_hint_block.") for k in keys)
    assert meta["studio.base_model"] == "tiny-sd1.safetensors" and meta["studio.preprocessor"] == "paired images"
    assert meta["studio.steps"] == "4" and meta["modelspec.architecture"] == "stable-diffusion-v1/controlnet"
    assert json.loads((Path(cfg.run_dir) / "progress.jsonl").read_text().splitlines()[0])["images"] == 4
    ours, family = load_controlnet(result.output)
    folder = Path(cfg.run_dir) / "controlnet_diffusers"
    theirs = ControlNetModel.from_pretrained(folder, local_files_only=True)
    single = ControlNetModel.from_single_file(str(result.output), config=str(folder), local_files_only=True)
    assert family == "sd1"
    for other in (theirs, single):
        sd = other.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in ours.state_dict().items())
    # it learnt: the zero convolutions are no longer zero
    assert ours.controlnet_down_blocks[0].weight.abs().sum() > 0


def test_resume_continues_with_the_same_losses(cn_cfg, tmp_path):
    from studio.training.progress import StopRequest
    from studio.training.trainer import Trainer
    full = Trainer(cn_cfg(run_dir=str(tmp_path / "a"), output_name="a")).run()
    cfg = cn_cfg(run_dir=str(tmp_path / "b"), output_name="b")
    stop = StopRequest(tmp_path / "b")

    def on_event(e):
        if e["type"] == "step" and e["step"] == 2:
            stop.request()
    first = Trainer(cfg, on_event=on_event, stop=stop).run()
    assert first.stopped and first.steps == 2 and first.output.is_file()
    cfg.resume = True
    second = Trainer(cfg).run()
    assert second.steps == 4 and len(second.losses) == 2
    assert torch.allclose(torch.tensor(first.losses + second.losses), torch.tensor(full.losses), atol=1e-5)


def test_preprocessor_conditions_are_made_once_and_shown_beside_samples(make_cfg, dataset, tmp_path):
    from studio.controlnet import default_preprocessors
    from studio.training.conditions import prepare_conditions
    from studio.training.trainer import Trainer
    cfg = make_cfg(method="controlnet", conditioning="canny", output_name="cnc", max_steps=2, sample_every=2,
                   sample_at_start=False, sample_prompts="a shape --w 64 --h 64 --s 2")
    pre = default_preprocessors()
    prepare_conditions(cfg, pre)
    made = sorted((Path(cfg.run_dir) / "conditions").glob("*.png"))
    assert len(made) == 4 and pre.runs["canny"] == 4
    prepare_conditions(cfg, pre)                       # same images, same settings: nothing is made again
    assert pre.runs["canny"] == 4
    result = Trainer(cfg).run()
    sample = Image.open(result.samples[0])
    assert sample.size == (128, 64)                    # the condition, then the sample
    left = sample.crop((0, 0, 64, 64))
    assert left.getextrema()[0] == (0, 255)            # an edge map: black with white edges
    (Path(dataset) / "img0.png").touch()               # a changed image gets a new map
    prepare_conditions(cfg, pre)
    assert pre.runs["canny"] >= 4 and len(list((Path(cfg.run_dir) / "conditions").glob("*.png"))) == 4


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "conditioning" / "img1.png").unlink(), "no condition image for img1.png"),
    (lambda d: Image.new("RGB", (64, 64)).save(d / "conditioning" / "stray.png"), "conditioning/stray.png"),
    (lambda d: Image.new("RGB", (32, 48)).save(d / "conditioning" / "img2.png"), "conditioning/img2.png is 32x48"),
])
def test_bad_pairs_are_refused_before_anything_starts(studio, settings, tmp_path, damage, named):
    """Through the Train tab / API path: a message naming the files, nothing queued, no run folder."""
    from studio.errors import StudioError
    folder = _pairs(studio.training.datasets_dir() / "pairs")
    damage(folder)
    cfg = {"base_model": "tiny-sd1", "method": "controlnet", "conditioning": "folder", "dataset_dir": str(folder),
           "resolution": 64, "min_image_side": 32, "output_name": "cn_bad", "max_steps": 2}
    with pytest.raises(StudioError) as err:
        studio.training.start(cfg, confined=True)
    assert named in str(err.value) and err.value.field == "controlnet.conditioning"
    assert studio.training.status() == {"current": None, "queued": []}
    assert not (studio.training.runs_dir / "cn_bad" / "run.toml").exists()


def test_unknown_preprocessor_and_wrong_family_controlnet_are_refused(studio, settings, tmp_path):
    from studio.errors import StudioError
    from tests import tinymodels
    from tests.controlnets import make_controlnet, write_ldm
    folder = write_dataset(studio.training.datasets_dir() / "plain", 2)
    cfg = {"base_model": "tiny-sd1", "method": "controlnet", "dataset_dir": str(folder), "resolution": 64,
           "min_image_side": 32, "output_name": "cn_x", "max_steps": 2}
    with pytest.raises(StudioError, match="blueprint_nope") as err:
        studio.training.start({**cfg, "conditioning": "blueprint_nope"}, confined=True)
    assert err.value.field == "controlnet.conditioning"
    xl = Path(settings.models_dir) / "ControlNet" / "xl-canny.safetensors"
    xl.parent.mkdir(parents=True, exist_ok=True)
    write_ldm(make_controlnet(tinymodels.make_tiny("sdxl", seed=0).unet), xl)
    with pytest.raises(StudioError) as err:
        studio.training.start({**cfg, "conditioning": "canny", "controlnet_init": "xl-canny"}, confined=True)
    assert "xl-canny.safetensors" in str(err.value) and "tiny-sd1.safetensors" in str(err.value)
    assert "SDXL" in str(err.value) and err.value.field == "controlnet.controlnet_init"
    assert studio.training.status() == {"current": None, "queued": []}


def test_refine_goes_on_from_a_trained_controlnet(cn_cfg, tmp_path):
    """``controlnet_init``: the second run starts from the first one's weights, not from the base UNet."""
    from studio.controlnet.models import load_controlnet
    from studio.training.trainer import Trainer
    first = Trainer(cn_cfg(run_dir=str(tmp_path / "one"), output_name="one")).run()
    cfg = cn_cfg(run_dir=str(tmp_path / "two"), output_name="two", controlnet_init=str(first.output),
                 learning_rate=1e-12)
    second = Trainer(cfg).run()
    a, _ = load_controlnet(first.output)
    b, _ = load_controlnet(second.output)
    assert all(torch.allclose(v, b.state_dict()[k], atol=1e-6) for k, v in a.state_dict().items())
    assert a.controlnet_down_blocks[0].weight.abs().sum() > 0
