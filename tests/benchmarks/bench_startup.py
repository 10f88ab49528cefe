"""Start-up benchmark (issue [2/9], [14]): `python launch.py` (already installed) to the first HTTP 200.

    python -m tests.benchmarks.bench_startup [--runs 3]

Starts the real launcher with --skip-install on a free port and an empty models folder (no model load),
polls http://127.0.0.1:PORT/ until it answers 200, and prints the median time; then prints the five
slowest top-level imports of the server module (python -X importtime).
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_200(tmp: str) -> float:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, str(ROOT / "launch.py"), "--skip-install", "--port", str(port),
           "--models-dir", f"{tmp}/models", "--data-dir", f"{tmp}/data", "--outdir", f"{tmp}/out"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < 120:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the server did not answer within 120 s")
    finally:
        proc.terminate()
        proc.wait(10)


def top_imports(n: int = 5) -> list[tuple[float, str]]:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import webui.server, webui.layout, studio.app"],
                         cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}).stderr
    best: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and "." not in m.group(3) and not m.group(3).startswith("_"):  # whole packages, cumulative time
            best[m.group(3)] = max(best.get(m.group(3), 0.0), int(m.group(1)) / 1e6)
    return sorted(((t, name) for name, t in best.items() if name not in ("webui", "studio")), reverse=True)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = [time_to_200(tmp) for _ in range(args.runs)]
    median = statistics.median(times)
    print(f"launch.py -> first HTTP 200: median {median:.2f} s over {args.runs} runs "
          f"({', '.join(f'{t:.2f}' for t in times)}); target <= 6 s (idle): {'yes' if median <= 6 else 'NO'}")
    print("slowest top-level imports (cumulative):")
    for seconds, name in top_imports():
        print(f"  {seconds:6.2f} s  {name}")


if __name__ == "__main__":
    main()
