"""Run a merge-kernel job (kernel.py): in a torch-free worker process when every input is a file, in this
process when some input only exists in memory (a pickled .ckpt, a diffusers folder, a loaded VAE).

The worker keeps a merge's memory to the kernel's own few blocks (the studio process is already holding torch,
and maybe models, and adds nothing), and an interrupt simply kills it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from ..errors import StudioError
from . import kernel
from .kernel_io import FileInput, MergeError

ROOT = Path(__file__).resolve().parents[2]   # the folder that holds the studio package


def run(ops: list, inputs: list, output: Path, metadata: dict | None,
        progress: Callable[[int, int, str], None] | None = None, sha256: bool = False) -> dict:
    """Write ``output`` per ``ops`` (kernel.run's format). ``inputs``: file paths (str / Path) or
    kernel_io.ArrayInput objects. Returns the kernel's figures (seconds, peak_rss, direct_io, in_process, sha256…)."""
    try:
        if all(isinstance(i, (str, os.PathLike)) for i in inputs):
            return _in_worker(ops, [os.fspath(i) for i in inputs], output, metadata, progress, sha256)
        return _in_process(ops, inputs, output, metadata, progress, sha256)
    except MergeError as e:
        raise StudioError(f"Merge failed: {e}", fix="check that the inputs are complete, readable models") from None


def _in_process(ops, inputs, output, metadata, progress, sha256) -> dict:
    opened = [FileInput(os.fspath(i)) if isinstance(i, (str, os.PathLike)) else i for i in inputs]
    try:
        stats = kernel.run(ops, opened, os.fspath(output), metadata, progress=progress, sha256=sha256)
    finally:
        for src in opened:
            src.close()
    return {**stats, "in_process": True}


def _in_worker(ops, paths, output, metadata, progress, sha256) -> dict:
    job = json.dumps({"ops": ops, "inputs": paths, "output": os.fspath(output), "metadata": metadata,
                      "sha256": sha256})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "studio.merge.kernel"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)  # never blocks the worker
    drain.start()
    result = failure = None
    try:
        try:
            proc.stdin.write(job + "\n")  # stdin then stays open: its end tells the worker to stop
            proc.stdin.flush()
        except BrokenPipeError:  # the worker died at start; its stderr says why
            pass
        for line in proc.stdout:
            tag, _, rest = line.rstrip("\n").partition(" ")
            if tag == "P" and progress:
                done, total, key = (rest.split(" ", 2) + [""])[:3]
                progress(int(done), int(total), key)
            elif tag == "OK":
                result = json.loads(rest)
            elif tag == "E":
                failure = rest
        code = proc.wait()
    except BaseException:  # an interrupt from the progress callback, or anything else: stop the worker now
        proc.kill()
        proc.wait()
        Path(output).unlink(missing_ok=True)
        raise
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        drain.join(timeout=5)
    if failure:
        raise MergeError(failure)
    if code != 0 or result is None:
        Path(output).unlink(missing_ok=True)
        tail = "".join(err[-6:]).strip() or "no message"
        raise StudioError(f"The merge worker stopped (exit code {code}): {tail}",
                          fix="see the log; if the machine ran out of memory, close other programs and retry")
    return {**result, "in_process": False}
