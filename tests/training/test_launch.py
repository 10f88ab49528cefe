"""The child-process path: TrainingService -> queue -> `accelerate launch` (one CPU process) -> models/Lora."""
from __future__ import annotations

import subprocess
import sys

from tests.training.conftest import write_dataset


def test_service_runs_accelerate_launch_child(studio, settings, tmp_path):
    from studio.training import TrainConfig, TrainingService
    ds = write_dataset(tmp_path / "ds", 4)
    svc = TrainingService(studio)
    with studio.manager.acquire("tiny-sd1.safetensors"):
        pass
    assert studio.manager.stats()["entries"]
    cfg = TrainConfig(base_model="tiny-sd1.safetensors", dataset_dir=str(ds), resolution=64, min_image_side=32,
                      rank=2, max_steps=2, batch_size=2, output_name="child", cache_latents="disk",
                      sample_prompts="a circle --w 64 --h 64 --s 2", sample_every=2, sample_at_start=False)
    first = svc.start(cfg)
    second = svc.start(cfg.__class__(**{**cfg.to_dict(), "output_name": "child2", "max_steps": 1}))
    status = svc.status()
    assert status["current"] is None or status["current"]["id"] == first
    assert svc.wait(timeout=300)
    hist = svc.history()
    assert [h["id"] for h in hist[:2]] == [second, first]           # one at a time, in order
    assert all(h["state"] == "done" for h in hist[:2]), hist
    out = settings.lora_path / "child.safetensors"
    assert out.is_file() and (settings.lora_path / "child2.safetensors").is_file()
    assert any(p.endswith("child.safetensors") for p in hist[1]["outputs"])
    run_dir = tmp_path / "data" / "training" / "child"
    assert (run_dir / "run.toml").is_file() and (run_dir / "state" / "trainer.json").is_file()
    assert list((run_dir / "samples").glob("step000002_00.png"))
    assert list((run_dir / "latents").glob("*.safetensors"))        # disk latent cache
    assert not studio.manager.stats().get("entries")                # device memory freed before the start


def test_cli_bad_config_message(tmp_path):
    (tmp_path / "bad.toml").write_text('[method]\nmethod = "dora"\n[model]\nbase_model = "x"\n')
    r = subprocess.run([sys.executable, "-m", "studio.training", str(tmp_path / "bad.toml")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "method" in r.stderr and "use one of" in r.stderr
