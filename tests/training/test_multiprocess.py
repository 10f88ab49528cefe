"""Two training processes for real (torchrun through ``accelerate launch``, gloo on the CPU), then a resume on one.

7 images on 2 processes is the case that hung: each process planned its own shard (4 vs 3 batches) and one waited
in ``save_state`` for the other forever.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.training.conftest import write_dataset

pytestmark = pytest.mark.multiprocess


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]


def test_multiprocess_two_ranks_same_plan_then_resume_on_one(make_cfg, tmp_path):
    from studio.training.runner import launch_training
    from studio.training.trainer import Trainer
    ds = write_dataset(tmp_path / "seven", 7)
    # 2 processes, batch 1: one round = 2 batches; max_steps 3 stops mid-epoch (6 of 7 batches done).
    # DreamBooth: the main process generates the class images, the other waits for them before it reads them
    cfg = make_cfg(dataset_dir=str(ds), batch_size=1, epochs=2, max_steps=3, save_every=2, rank=2,
                   output_name="mp", cache_latents="disk", method="dreambooth_lora", instance_prompt="shp shape",
                   class_prompt="a shape", class_images_dir=str(tmp_path / "class"), num_class_images=2).resolved()
    run_dir, out_dir = Path(cfg.run_dir), Path(cfg.output_dir)
    toml = cfg.save(run_dir / "run.toml")
    proc = launch_training(toml, num_processes=2)
    try:
        code = proc.wait(240)
    except Exception:
        proc.kill()
        raise AssertionError("the two-process run hung:\n" + proc.log_tail(80)) from None
    log = proc.log_tail(200)
    assert code == 0, log
    # both ranks ran the same plan: each prints its own summary line
    assert re.findall(r"finished at step (\d+)/(\d+)", log) == [("3", "3")] * 2, log
    assert len(list((tmp_path / "class").glob("class_*.png"))) == 2       # made by this run
    events = _events(run_dir)                       # the main process's events only
    assert all(e["prior_loss"] is not None for e in events if e["type"] == "step")
    assert events[0]["type"] == "start" and events[0]["total"] == 3 and events[0]["processes"] == 2
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    saved = [Path(e["path"]).name for e in events if e["type"] == "saved"]
    assert saved == ["mp-000002.safetensors", "mp.safetensors"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(saved) and not list(out_dir.glob(".*"))
    state = run_dir / "state"
    assert {"random_states_0.pkl", "random_states_1.pkl", "trained.safetensors"} <= {p.name for p in state.iterdir()}
    assert not (run_dir / "state.tmp").exists() and not (run_dir / "state.old").exists()
    pos = json.loads((state / "trainer.json").read_text())
    assert pos == {"step": 3, "epoch": 0, "consumed": 6, "num_processes": 2}

    # the same run on one process, to the end of its 2 epochs: 1 batch left in epoch 0, then 7
    cfg.resume, cfg.max_steps = True, 0
    events = []
    result = Trainer(cfg, on_event=events.append).run()
    start = events[0]
    assert start["type"] == "start" and start["step"] == 3 and start["resumed"] and start["processes"] == 1
    steps = [(e["step"], e["epoch"]) for e in events if e["type"] == "step"]
    assert steps == [(4, 0)] + [(s, 1) for s in range(5, 12)]
    assert result.steps == result.total_steps == 11 and not result.stopped
    assert json.loads((state / "trainer.json").read_text())["num_processes"] == 1
