"""The trainer process: it dies with the studio that started it, one trainer per run folder, Stop at any time."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from studio.errors import StudioError

REPO = Path(__file__).resolve().parents[2]


def wait_for(cond, timeout: float = 180.0, every: float = 0.2, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds ``run_dir``'s lock (a trainer somebody else started) until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from studio.training.lifetime import RunLock
        RunLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def service_for(tmp_path):
    from studio.training.service import TrainingService
    settings = SimpleNamespace(data_dir=str(tmp_path / "data"), models_dir=str(tmp_path / "models"),
                               lora_path=tmp_path / "models" / "Lora", embeddings_path=tmp_path / "models" / "emb")
    return TrainingService(SimpleNamespace(settings=settings))


def test_trainer_dies_when_its_server_is_killed(make_cfg, tmp_path):
    """kill -9 of the process that launched the trainer ends the trainer (and frees the run's lock)."""
    from studio.training.lifetime import is_alive, lock_owner
    cfg = make_cfg(max_steps=100000, output_name="orphan", cache_latents="none").resolved()
    toml = cfg.save(Path(cfg.run_dir) / "run.toml")
    server = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from studio.training.runner import launch_training
        p = launch_training({str(toml)!r})
        print(p.proc.pid, flush=True)
        p.wait()
    """)
    srv = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True, cwd=REPO)
    launcher = int(srv.stdout.readline())
    try:
        owner = wait_for(lambda: lock_owner(cfg.run_dir), what="the trainer to lock its run")
        trainer = owner["pid"]
        assert trainer not in (srv.pid, launcher) and is_alive(trainer, owner["started"])
        wait_for(lambda: (Path(cfg.run_dir) / "progress.jsonl").is_file(), what="training to start")
        os.kill(srv.pid, signal.SIGKILL)
        srv.wait(30)
        # SIGTERM: it finishes its step and saves (a busy machine may take a while), then exits
        wait_for(lambda: not is_alive(trainer, owner["started"]), timeout=240, what="the trainer to end")
        assert not is_alive(launcher)
        assert lock_owner(cfg.run_dir) is None            # the next studio may resume it ...
        assert (Path(cfg.run_dir) / "state" / "trainer.json").is_file()   # ... from where it was
    finally:
        for pid in (srv.pid, launcher, locals().get("trainer")):
            if pid and is_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_owner_watch_fallback_notices_a_dead_owner(monkeypatch):
    """Where there is no PR_SET_PDEATHSIG the trainer polls the studio's pid (start time included)."""
    import threading
    from studio.training import lifetime
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        wait_for(lambda: lifetime.start_time(owner.pid), what="owner start")
        monkeypatch.setenv(lifetime.OWNER_ENV, f"{owner.pid}:{lifetime.start_time(owner.pid):.3f}")
        gone = threading.Event()
        lifetime.watch_owner(gone.set, interval=0.05, grace=None)
        time.sleep(0.3)
        assert not gone.is_set()
        owner.kill()
        owner.wait()
        assert gone.wait(30)
    finally:
        owner.kill()
    # a recycled pid is not the owner: same pid, another start time
    assert not lifetime.is_alive(os.getpid(), lifetime.start_time() - 1000)


def test_locked_run_is_refused_then_a_stale_lock_is_taken_over(make_cfg, tmp_path):
    from studio.training.lifetime import RunLock, lock_owner
    from studio.training.trainer import Trainer
    svc = service_for(tmp_path)
    cfg = make_cfg(output_name="busy", run_dir="", output_dir=str(tmp_path / "models" / "Lora"))
    run_dir = svc.complete(cfg).run_dir
    svc.write_config(cfg)
    holder = hold_lock(Path(run_dir))
    try:
        assert lock_owner(run_dir)["pid"] == holder.pid
        for attempt in (lambda: svc.start(cfg), lambda: svc.resume("busy"), lambda: svc.start(cfg, resume=True)):
            with pytest.raises(StudioError) as err:
                attempt()
            assert f"already being trained by process {holder.pid}" in str(err.value)
            assert err.value.field == "output.output_name"
        assert not svc.queue.pending() and svc.queue.current is None
        # the trainer itself refuses too, and writes nothing into the other trainer's progress file
        with pytest.raises(StudioError, match="already being trained"):
            Trainer(svc.complete(cfg)).run()
        assert not (Path(run_dir) / "progress.jsonl").exists()
        hist = {Path(h["config"]).parent.name: h for h in svc.history()}
        assert hist["busy"]["state"] == "running" and hist["busy"]["resumable"] is False
        assert str(holder.pid) in hist["busy"]["note"]
    finally:
        holder.kill()
        holder.wait()
    assert lock_owner(run_dir) is None                    # the holder died: its lock is stale
    lock = RunLock(run_dir).acquire()
    try:
        assert lock.took_over["pid"] == holder.pid
        assert lock_owner(run_dir)["pid"] == os.getpid()
    finally:
        lock.release()
    assert svc.history()[0]["state"] == "on disk"


def test_service_refuses_a_run_already_in_its_queue(make_cfg, tmp_path, monkeypatch):
    svc = service_for(tmp_path)
    monkeypatch.setattr(svc.queue, "_thread", SimpleNamespace(is_alive=lambda: True))   # keep it queued
    cfg = make_cfg(output_name="twice", run_dir="", output_dir=str(tmp_path / "models" / "Lora"))
    first = svc.start(cfg)
    with pytest.raises(StudioError, match="already queued or running"):
        svc.start(cfg)
    with pytest.raises(StudioError, match="already queued or running"):
        svc.resume("twice")
    assert [j["id"] for j in svc.queue.pending()] == [first]
    assert svc.start(make_cfg(output_name="other", run_dir="", output_dir=str(tmp_path / "models" / "Lora")))


def test_stop_ends_a_child_run_early_even_before_its_first_step(make_cfg, tmp_path):
    """Stop pressed while the trainer is still starting (importing torch, loading the model) is kept; Stop at an
    early step ends the run well before max_steps. Both leave a usable LoRA and the state "stopped"."""
    from safetensors import safe_open
    from studio.adapters import load_lora_file
    from studio.training.runner import launch_training
    cfg = make_cfg(max_steps=40, output_name="early", sample_prompts="a circle --w 64 --h 64 --s 2",
                   sample_every=10).resolved()
    toml = cfg.save(Path(cfg.run_dir) / "run.toml")
    out = Path(cfg.output_dir) / "early.safetensors"
    proc = launch_training(toml)
    proc.stop()
    assert proc.status()["state"] == "stopping"              # not "running" once Stop was pressed
    assert proc.wait(300) == 0
    status = proc.status()
    assert status["state"] == "stopped" and status["step"] == 0, status["log"]
    assert out.is_file() and str(out) in status["outputs"]
    assert not (Path(cfg.run_dir) / "STOP").exists()           # honoured, then gone: the resume starts clean

    proc = launch_training(toml, resume=True)
    wait_for(lambda: proc.status()["step"] >= 2 or not proc.running, what="two steps")
    proc.stop()
    assert proc.wait(300) == 0
    status = proc.status()
    assert status["state"] == "stopped", status["log"]
    assert 2 <= status["step"] < 30
    lf = load_lora_file(out)
    assert lf.kind == "lora" and not lf.unknown_keys
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_steps"] == str(status["step"])


def test_stop_during_sampling_and_latent_caching(make_cfg, tmp_path):
    """Sampling checks Stop between denoising steps (and keeps no half-denoised image); caching per image."""
    import torch
    from studio.training.buckets import LatentCache
    from studio.training.dataset import scan_dataset
    from studio.training.sampling import read_prompts, render_samples
    from tests.training.helpers import fresh_base
    cfg = make_cfg().resolved()
    c = fresh_base(cfg)
    calls = []
    hook = c.unet.register_forward_hook(lambda *a: calls.append(1))
    asked = []

    def stop():
        asked.append(1)
        return len(calls) >= 3                        # pressed during the first image's denoising
    prompts = read_prompts("a circle --w 64 --h 64 --s 30\na square --w 64 --h 64 --s 30")
    events = render_samples(c, prompts, tmp_path / "samples", 5, stop=stop)
    hook.remove()
    assert events == [] and not list((tmp_path / "samples").glob("*.png"))
    assert len(calls) < 30                            # far fewer UNet calls than the 2 x 30 steps asked for
    items = scan_dataset(cfg.dataset_dir, min_side=32).items
    cache = LatentCache(c.vae)
    with torch.no_grad():
        cache.warm(items, [(64, 64)] * len(items), False, stop=lambda: cache.encodes >= 1)
    assert cache.encodes == 1 < len(items)
