"""A trainer lives no longer than the studio that started it, and one run folder has one trainer at a time.

* ``die_with_parent`` / ``preexec_die_with_parent``: Linux ``PR_SET_PDEATHSIG`` (the kernel signals the child
  when its parent dies, even by ``kill -9``). ``watch_owner`` is the portable fallback: the trainer polls the
  studio's pid (passed in ``STUDIO_TRAIN_OWNER`` as ``pid:start_time``, so a recycled pid does not count) and
  stops itself when it is gone.
* ``RunLock``: ``<run_dir>/train.lock`` holds the trainer's pid and process start time and is ``flock``-ed by
  the trainer for as long as it runs. The kernel drops the lock when the process dies however it dies, so a
  stale file is simply taken over; ``lock_owner`` tells who holds a run (the service refuses a second trainer).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import StudioError

OWNER_ENV = "STUDIO_TRAIN_OWNER"
LOCK_FILE = "train.lock"
PR_SET_PDEATHSIG = 1

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


# ---- process identity ------------------------------------------------------------------------------------------
def start_time(pid: int | None = None) -> float | None:
    """The process's start time (seconds since the epoch), None when there is no such (living) process."""
    import psutil
    try:
        p = psutil.Process(os.getpid() if pid is None else pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except (psutil.Error, ValueError):
        return None


def is_alive(pid: int | None, started: float | None = None) -> bool:
    """``pid`` runs and is the process that started at ``started`` (not a later one that got the same pid)."""
    if not pid:
        return False
    t = start_time(int(pid))
    return t is not None and (started is None or abs(t - float(started)) < 1.0)


def owner_token() -> str:
    """What a child gets in ``STUDIO_TRAIN_OWNER``: this process as ``pid:start_time``."""
    return f"{os.getpid()}:{start_time() or 0:.3f}"


def _parse_owner(token: str | None) -> tuple[int, float | None] | None:
    if not token:
        return None
    pid, _, started = token.partition(":")
    try:
        return int(pid), (float(started) or None) if started else None
    except ValueError:
        return None


# ---- dying with the parent -------------------------------------------------------------------------------------
def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def preexec_die_with_parent() -> None:
    """``Popen(preexec_fn=...)`` for the ``accelerate launch`` wrapper: it holds nothing, so SIGKILL; the
    trainer under it then gets its own signal (``die_with_parent`` at its start)."""
    die_with_parent(signal.SIGKILL)


def watch_owner(on_gone=None, *, interval: float = 1.0, grace: float | None = 120.0) -> threading.Thread | None:
    """In the trainer: stop when the studio that launched it (``STUDIO_TRAIN_OWNER``) is gone.

    ``on_gone`` defaults to SIGTERM to this process (what the trainer's stop handler listens to: it saves its
    state and exits); if it is still alive ``grace`` seconds later it exits hard (None: never)."""
    owner = _parse_owner(os.environ.get(OWNER_ENV))
    if owner is None:
        return None
    on_gone = on_gone or (lambda: os.kill(os.getpid(), signal.SIGTERM))

    def watch() -> None:
        while is_alive(*owner):
            time.sleep(interval)
        on_gone()
        if grace is not None:
            time.sleep(grace)
            os._exit(3)

    t = threading.Thread(target=watch, name="studio-owner-watch", daemon=True)
    t.start()
    return t


def tie_to_owner() -> None:
    """Child start: signal on the parent's death, and the polling fallback (other OSes, a dead grandparent)."""
    die_with_parent(signal.SIGTERM)
    watch_owner()


# ---- one trainer per run folder --------------------------------------------------------------------------------
def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover - Windows: lock the first byte
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(fd: int) -> None:
    if fcntl is None:  # pragma: no cover
        import msvcrt
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def lock_owner(run_dir: str | os.PathLike) -> dict | None:
    """``{"pid", "started", "host"}`` of the live trainer holding ``run_dir``; None when the run is free."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None          # nobody holds it: whatever the file says is a stale lock
    finally:
        os.close(fd)
    info = _read_info(path)
    if info.get("host", socket.gethostname()) == socket.gethostname() and info.get("pid") \
            and not is_alive(info["pid"], info.get("started")):
        return None              # locks on network filesystems can outlive their process
    return info or {"pid": None}


def describe_owner(info: dict) -> str:
    pid = info.get("pid")
    when = info.get("started")
    since = f", running since {time.strftime('%H:%M:%S', time.localtime(when))}" if when else ""
    return f"process {pid}{since}" if pid else "another process"


def locked_error(run_dir: str | os.PathLike, info: dict) -> StudioError:
    return StudioError(f"Run {Path(run_dir).name!r} is already being trained by {describe_owner(info)}.",
                       field="output.output_name",
                       fix="wait for it to finish, stop it, or train under another output name", status=409)


class RunLock:
    """``with RunLock(run_dir):`` the caller is the run's only trainer (StudioError when another one is)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self.took_over: dict | None = None      # what a stale lock file said (a trainer that died)

    def acquire(self, timeout: float = 3.0) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        end = time.monotonic() + timeout        # a studio probing the lock holds it for microseconds
        while not _try_lock(fd):
            if time.monotonic() > end:
                os.close(fd)
                raise locked_error(self.run_dir, _read_info(self.path))
            time.sleep(0.05)
        old = _read_info(self.path)
        self.took_over = old if old.get("pid") else None
        info = {"pid": os.getpid(), "started": start_time(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        # the file stays (removing it would let two processes lock two different files of the same name)
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        _unlock(self._fd)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()
