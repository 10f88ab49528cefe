"""Running trainings: the CLI (``python -m studio.training run.toml``), a child process started with
``accelerate launch``, and the queue that lets one training run at a time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .config import TrainConfig
from .lifetime import (OWNER_ENV, RunLock, lock_owner, locked_error, owner_token, preexec_die_with_parent,
                       tie_to_owner)
from .progress import PROGRESS_FILE, STOP_FILE, read_events

REPO_ROOT = Path(__file__).resolve().parents[2]
CLASS_IMAGE_HOURS = 12      # how long the other processes of a multi-GPU run wait for the main one's class images


# ---- in-process / CLI ------------------------------------------------------------------------------------------
class ConsoleBar:
    """A one-line progress bar on stderr (no dependency); prints samples, saves and errors on their own line."""

    def __init__(self, stream=None, width: int = 30):
        self.stream, self.width = stream or sys.stderr, width

    def __call__(self, e: dict) -> None:
        kind = e.get("type")
        if kind == "step":
            done = e["step"] / max(e["total"], 1)
            bar = "#" * int(done * self.width)
            eta = f"{e['eta']:.0f}s" if e.get("eta") is not None else "?"
            self.stream.write(f"\r[{bar:<{self.width}}] {e['step']}/{e['total']} loss {e['loss']:.4f} "
                              f"{e['it_s']:.2f} it/s eta {eta}   ")
        elif kind in ("saved", "sample", "done", "stopped", "error", "start", "class_image"):
            text = {k: v for k, v in e.items() if k not in ("time", "buckets", "skipped")}
            self.stream.write(f"\n{kind}: {text}")
            if kind in ("done", "stopped", "error"):
                self.stream.write("\n")
        self.stream.flush()


def prepare_class_images(cfg: TrainConfig, studio=None, progress=None) -> None:
    """DreamBooth: generate missing class images through a Studio (built here when none is given)."""
    from .dreambooth import ensure_class_images, missing_class_images
    cfg = cfg.resolved()
    if cfg.method != "dreambooth_lora" or not missing_class_images(cfg):
        return
    own = studio is None
    if own:
        from ..app import Studio
        from ..settings import Settings
        studio = Studio(Settings(models_dir=cfg.models_dir, data_dir=str(Path(cfg.run_dir) / "studio-data"),
                                 outdir=str(Path(cfg.run_dir) / "outputs"), save_images=False))
    try:
        ensure_class_images(cfg, studio, progress=progress)
    finally:
        if own:
            studio.close()


def run_config(path: str | os.PathLike, *, bar: bool = True, resume: bool | None = None):
    """Run a TOML config in this process (what the child process and the CLI do)."""
    from .trainer import Trainer
    cfg = TrainConfig.load(path)
    if resume is not None:
        cfg.resume = resume
    cb = ConsoleBar() if bar else None
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # several processes: the main one makes the class images, the others wait for them at a barrier (made
        # long: generating hundreds of class images takes longer than torch's default 10-30 minutes)
        from datetime import timedelta

        from accelerate import PartialState
        import torch
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=CLASS_IMAGE_HOURS))
        if not state.is_main_process:
            state.wait_for_everyone()
            return Trainer(cfg, on_event=cb).run()
    # the run folder is ours from the class images to the last save; a second trainer is refused
    with RunLock(cfg.resolved().run_dir) as lock:
        prepare_class_images(cfg, progress=cb)
        from .conditions import prepare_conditions
        prepare_conditions(cfg, progress=cb)
        if state is not None:
            state.wait_for_everyone()
        return Trainer(cfg, on_event=cb, lock=lock).run()


def cli_main(argv: list[str] | None = None) -> int:
    """``python -m studio.training run.toml [--resume] [--no-bar]``; also what ``launch.py --train`` calls."""
    from ..errors import StudioError
    if os.environ.get(OWNER_ENV):
        tie_to_owner()      # started by a studio: end with it (a shell user's nohup run is left alone)
    p = argparse.ArgumentParser(prog="python -m studio.training", description="Run a training config.")
    p.add_argument("config", help="TOML run config")
    p.add_argument("--resume", action="store_true", help="continue from the last saved state")
    p.add_argument("--no-bar", action="store_true", help="no console progress bar")
    args = p.parse_args(argv)
    try:
        result = run_config(args.config, bar=not args.no_bar, resume=True if args.resume else None)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'stopped' if result.stopped else 'finished'} at step {result.steps}/{result.total_steps}: "
          f"{result.output}")
    return 0


# ---- child process ---------------------------------------------------------------------------------------------
def launch_command(config_path: str | os.PathLike, num_processes: int = 1, *, cpu: bool | None = None,
                   resume: bool = False) -> list[str]:
    import torch
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--num_cpu_threads_per_process", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    if num_processes > 1:
        # torchrun's launcher, also for CPU processes (accelerate's --cpu starts one process unless MPI is set
        # up); a CPU-only machine then trains on gloo. Port 0: a free one, so two runs never collide.
        cmd += ["--multi_gpu", "--main_process_port", "0"]
    elif cpu:
        cmd.append("--cpu")
    cmd += ["-m", "studio.training", os.fspath(config_path), "--no-bar"]
    return cmd + (["--resume"] if resume else [])


class TrainingProcess:
    """A training running in a child process; progress comes from the run folder's JSON-lines file.

    The child ends with this process (see ``lifetime``). On Linux it also ends with the thread that made it
    (``PR_SET_PDEATHSIG`` follows the creating thread): create it on a thread that outlives the run, as the
    queue's worker does (it waits for the process)."""

    def __init__(self, config_path: str | os.PathLike, num_processes: int = 1, *, resume: bool = False,
                 env: dict | None = None):
        self.config_path = Path(config_path)
        self.cfg = TrainConfig.load(config_path).resolved()
        self.run_dir = Path(self.cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress_file = self.run_dir / PROGRESS_FILE
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        # only this launch's events: earlier runs (before a resume) stay in the file above this offset
        self._offset = self.progress_file.stat().st_size if self.progress_file.exists() else 0
        self.events: list[dict] = []
        self.stop_requested = False
        self.log_path = self.run_dir / "train.log"
        child_env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                     OWNER_ENV: owner_token(), **(env or {})}
        self._log = open(self.log_path, "ab")
        # the launcher dies with us (Linux); the trainer under it with the launcher, or by watching our pid
        self.proc = subprocess.Popen(launch_command(self.config_path, num_processes, resume=resume),
                                     cwd=REPO_ROOT, env=child_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=preexec_die_with_parent if sys.platform.startswith("linux")
                                     else None)

    def poll(self) -> list[dict]:
        """New events since the last call (also appended to ``events``)."""
        new, self._offset = read_events(self.progress_file, self._offset)
        self.events += new
        return new

    def stop(self) -> None:
        """Ask the trainer to stop: it saves its state and a usable LoRA, then exits."""
        self.stop_requested = True
        (self.run_dir / STOP_FILE).touch()

    def kill(self) -> None:
        self.proc.terminate()

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self.poll()
                self._log.close()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def status(self) -> dict:
        self.poll()
        steps = [e for e in self.events if e.get("type") == "step"]
        last = steps[-1] if steps else {}
        ends = [e for e in self.events if e.get("type") in ("done", "stopped", "error")]
        code = self.proc.poll()
        state = "running" if code is None else ends[-1]["type"] if ends else ("done" if code == 0 else "error")
        if code not in (None, 0) and state != "error":
            state = "error"
        if state == "running" and self.stop_requested:
            state = "stopping"    # the trainer finishes its step, saves state and the LoRA, then exits
        return {"state": state, "returncode": code, "step": last.get("step", 0), "total": last.get("total"),
                "loss": last.get("loss"), "lr": last.get("lr"), "it_s": last.get("it_s"), "eta": last.get("eta"),
                "epoch": last.get("epoch"), "losses": [(e["step"], e["loss"]) for e in steps],
                "samples": [e for e in self.events if e.get("type") == "sample"],
                "outputs": [e["path"] for e in self.events if e.get("type") == "saved"],
                "error": next((e["message"] for e in reversed(ends) if e["type"] == "error"), None)
                or (self._log_error() if state == "error" else None),
                "config": str(self.config_path), "run_dir": str(self.run_dir), "log": self.log_tail()}

    def _log_error(self) -> str | None:
        """The CLI's ``error: ...`` line (a failure before training started, e.g. the run is locked)."""
        return next((ln[7:] for ln in reversed(self.log_tail(200).splitlines()) if ln.startswith("error: ")), None)

    def log_tail(self, lines: int = 40) -> str:
        try:
            data = self.log_path.read_bytes()[-20000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(data.splitlines()[-lines:])


def launch_training(config_path: str | os.PathLike, num_processes: int = 1, *, resume: bool = False,
                    env: dict | None = None) -> TrainingProcess:
    """Start ``accelerate launch ... -m studio.training config`` as a child process."""
    return TrainingProcess(config_path, num_processes, resume=resume, env=env)


def _run_dir_of(config_path, run_dir=None) -> str | None:
    try:
        return str(Path(run_dir or TrainConfig.load(config_path).resolved().run_dir).resolve())
    except Exception:  # noqa: BLE001 - an unreadable config fails at its launch, with its own message
        return None


class TrainingQueue:
    """One training at a time; later submissions wait. ``before_start(job)`` runs just before each launch (the
    studio frees device memory there)."""

    def __init__(self, before_start=None, after_end=None, num_processes: int = 1, poll_seconds: float = 0.5):
        self.before_start, self.after_end = before_start, after_end
        self.num_processes, self.poll_seconds = num_processes, poll_seconds
        self._lock = threading.Condition()
        self._pending: list[dict] = []
        self.current: dict | None = None
        self.finished: list[dict] = []
        self._counter = 0
        self._thread: threading.Thread | None = None

    def submit(self, config_path: str | os.PathLike, *, resume: bool = False) -> str:
        with self._lock:
            self._counter += 1
            job = {"id": f"train-{self._counter}-{int(time.time())}", "config": str(config_path),
                   "run_dir": _run_dir_of(config_path), "resume": resume, "process": None, "state": "queued",
                   "error": None, "stop": False}
            self._pending.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name="training-queue", daemon=True)
                self._thread.start()
            return job["id"]

    def pending(self) -> list[dict]:
        with self._lock:
            return [dict(j, process=None) for j in self._pending]

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            before = len(self._pending)
            self._pending = [j for j in self._pending if j["id"] != job_id]
            return len(self._pending) < before

    def run_dir_busy(self, run_dir: str | os.PathLike) -> bool:
        """A job of this queue (running or waiting) trains ``run_dir``."""
        key = _run_dir_of(None, run_dir)
        with self._lock:
            return any(j and j.get("run_dir") == key for j in [self.current, *self._pending])

    def stop_current(self) -> bool:
        """Stop the running job; one still preparing (class images) never launches its trainer."""
        with self._lock:
            job = self.current
            if job is None:
                return False
            job["stop"] = True
            proc = job.get("process")
        if proc:
            proc.stop()
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.time() + timeout
        with self._lock:
            while self._pending or self.current:
                left = None if end is None else end - time.time()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def _worker(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    self._lock.notify_all()
                    return
                job = self.current = self._pending.pop(0)
            try:
                if self.before_start:
                    self.before_start(job)
                if job["stop"]:
                    job["state"] = "stopped"          # Stop pressed while preparing: nothing was trained
                    continue
                owner = lock_owner(job["run_dir"]) if job["run_dir"] else None
                if owner is not None:                 # taken since it was queued (a trainer we do not own)
                    raise locked_error(job["run_dir"], owner)
                job["state"] = "running"
                with self._lock:
                    job["process"] = launch_training(job["config"], self.num_processes, resume=job["resume"])
                    if job["stop"]:
                        job["process"].stop()
                job["process"].wait()
                job["state"] = job["process"].status()["state"]
            except Exception as exc:  # noqa: BLE001 - a failed start must not stop the queue
                job["state"], job["error"] = "error", str(exc)
            finally:
                if self.after_end:
                    try:
                        self.after_end(job)
                    except Exception:  # noqa: BLE001
                        pass
                with self._lock:
                    self.finished.append(job)
                    self.current = None
                    self._lock.notify_all()
