"""The GPU check script keeps working: its CPU smoke run passes, every check prints one line, a FAIL exits 1."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.gpu import check

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S+): (.+)$")


def test_cpu_smoke_run_passes_and_skips_the_offload_checks_with_the_reason():
    r = subprocess.run([sys.executable, "-m", "tests.gpu.check", "--device", "cpu", "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    parsed = [LINE.match(ln) for ln in lines]
    assert all(parsed), r.stdout
    status = {m[2]: (m[1], m[3]) for m in parsed}
    assert list(status) == [name for name, _ in check.plan(None)]
    offload = {n: v for n, v in status.items() if "medvram" in n or "lowvram" in n}
    assert len(offload) == 12 and all(s == "SKIP" and "needs a CUDA device" in d for s, d in offload.values())
    assert status["train/2-process-7-images"][0] == "SKIP"
    ran = {n: s for n, (s, _) in status.items() if n not in offload and not n.startswith("train/")}
    assert all(s == "PASS" for s in ran.values()) and r.returncode == 0, r.stdout + r.stderr[-4000:]


def test_a_failing_check_prints_fail_and_exits_1(monkeypatch, tmp_path):
    def boom() -> str:
        raise AssertionError("the image is black")

    def skip() -> str:
        raise check.Skip("not here")

    monkeypatch.setattr(check, "make_env", lambda device, quick, root, size=None: check.Env(device, quick, root, 64, 2))
    monkeypatch.setattr(check, "plan", lambda env: [("ok", lambda: "fine"), ("bad", boom), ("away", skip)])
    out = io.StringIO()
    assert check.main(["--device", "cpu"], out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("PASS ok: fine (") and lines[1].startswith("FAIL bad: the image is black (")
    assert lines[2] == "SKIP away: not here" and lines[3] == "# 3 checks: 1 passed, 1 failed, 1 skipped"
    out = io.StringIO()
    assert check.main(["--device", "cpu", "--only", "ok"], out=out) == 0


def test_cuda_asked_without_cuda_says_what_to_do(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = io.StringIO()
    assert check.main([], out=out) == 1
    assert "no CUDA device" in out.getvalue() and "--device cpu" in out.getvalue()
