"""Dynamic batching (``queue_batch``): 8 compatible txt2img jobs sent together to the REST API, one by one against
batched. Run on demand; prints ratios measured in ONE run (medians over ``--runs`` alternating rounds).

    python -m tests.benchmarks.bench_queue [--runs 3]

Each round posts 8 requests (other prompts and seeds, same model, size, steps and sampler) from 8 client threads
while the queue is held, releases it and times until the last answer; ``queue_batch`` 1 and 8 alternate. Models:
the demo model (64 px) and bench_speed's mid-size SD1 UNet (256 px, where the UNet's arithmetic dominates).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

JOBS = 8
PROMPTS = ["a red circle on a white background", "a blue square on a yellow background",
           "a green triangle on a white background", "a yellow star on a black background"]


def one_round(studio, client, checkpoint: str, size: int, queue_batch: int, seed: int) -> float:
    """Seconds from releasing 8 waiting API jobs to the last answer."""
    release = threading.Event()
    studio.settings.queue_batch = queue_batch
    hold = studio.queue.submit(lambda ctx: release.wait(600), kind="bench-hold")
    codes: list[int] = []

    def post(k: int) -> None:
        body = {"prompt": PROMPTS[k % len(PROMPTS)], "seed": seed + k, "steps": 20, "sampler_name": "DPM++ 2M",
                "scheduler": "Karras", "width": size, "height": size, "save_images": False,
                "override_settings": {"sd_model_checkpoint": checkpoint}}
        codes.append(client.post("/sdapi/v1/txt2img", json=body).status_code)

    threads = [threading.Thread(target=post, args=(k,)) for k in range(JOBS)]
    for t in threads:
        t.start()
    while len(studio.queue.pending()) < JOBS:
        time.sleep(0.01)
    start = time.perf_counter()
    release.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    hold.wait(10)
    studio.settings.queue_batch = 1
    assert codes == [200] * JOBS, codes
    return elapsed


def bench(studio, client, checkpoint: str, size: int, runs: int) -> tuple[float, float, float]:
    """(median one-by-one seconds, median batched seconds, median of the per-round ratios)."""
    one_round(studio, client, checkpoint, size, 8, 0)      # warm-up: load, first-call costs
    alone, batched = [], []
    for r in range(runs):
        order = (1, 8) if r % 2 == 0 else (8, 1)
        for n in order:
            (alone if n == 1 else batched).append(one_round(studio, client, checkpoint, size, n, 100 * r))
    ratio = statistics.median(b / a for a, b in zip(alone, batched))
    return statistics.median(alone), statistics.median(batched), ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-mid", action="store_true", help="only the demo model")
    ap.add_argument("--skip-demo", action="store_true", help="only the mid-size UNet")
    args = ap.parse_args()
    from fastapi.testclient import TestClient

    from studio.demo import TRAINED_NAME
    from tests.api.conftest import make_app
    from tests.benchmarks.bench_speed import bench_studio

    with tempfile.TemporaryDirectory() as tmp:
        studio = bench_studio(Path(tmp))
        try:
            with TestClient(make_app(studio)) as client:
                rows = [] if args.skip_demo else [("demo model (64 px, 20 steps)", TRAINED_NAME, 64)]
                if not args.skip_mid:
                    rows.append(("mid-size SD1 UNet (256 px, 20 steps)", "mid-sd1.safetensors", 256))
                print(f"{JOBS} API jobs sent together, queue_batch 8 against 1 (medians of {args.runs} rounds)")
                for label, checkpoint, size in rows:
                    alone, batched, ratio = bench(studio, client, checkpoint, size, args.runs)
                    print(f"  {label:40s} one by one {alone:6.2f} s  batched {batched:6.2f} s  ratio {ratio:.3f}",
                          flush=True)
        finally:
            studio.close()


if __name__ == "__main__":
    main()
