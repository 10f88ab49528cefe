"""REST API benchmark (issue [3/9]): run on demand, prints a table of ratios measured in ONE run.

    python -m tests.benchmarks.bench_api [--runs 9] [--steps 20] [--size 64] [--clients 8] [--requests 16] [--rounds 3]

1. API txt2img round trip (HTTP + JSON + PNG/base64 of the images) / the engine call ``studio.generate`` for the
   same request on the tiny model, median, interleaved; target <= 1.10.
2. Throughput (images/s) with N concurrent clients / with one client sending the same number of requests one
   after another (clients in their own processes; median ratio over alternated rounds). The queue runs one job
   at a time, so this should be ~1.0: no thrash, nothing lost. It may exceed 1: with several clients the next
   job is already queued while the previous response travels, so the device never idles between requests.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

from studio.app import Studio  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tests import tinymodels  # noqa: E402
from tests.api.conftest import make_app, serve  # noqa: E402


def body(args: argparse.Namespace, seed: int) -> dict:
    return {"prompt": "a castle on a hill", "negative_prompt": "blurry", "steps": args.steps, "width": args.size,
            "height": args.size, "sampler_name": "DPM++ 2M", "seed": seed, "cfg_scale": 7}


def post_one(job: tuple[str, dict]) -> int:
    url, payload = job
    with httpx.Client(base_url=url, timeout=300) as c:
        r = c.post("/sdapi/v1/txt2img", json=payload)
        r.raise_for_status()
        return len(r.json()["images"])


def post_many(job: tuple[str, list]) -> int:
    url, payloads = job
    return sum(post_one((url, p)) for p in payloads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from studio.api.convert import to_request
    from studio.api.models import Txt2ImgRequest
    from studio.api.options import OptionsStore

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        (root / "Stable-diffusion").mkdir(parents=True)
        tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=0), root / "Stable-diffusion" / "tiny.safetensors")
        settings = Settings(models_dir=str(root), data_dir=str(Path(tmp) / "data"), outdir=str(Path(tmp) / "out"),
                            default_checkpoint="tiny.safetensors")
        studio = Studio(settings)
        try:
            # the engine gets exactly the request the API builds from the body
            request, _ = to_request(Txt2ImgRequest(**body(args, 1)), studio, OptionsStore(Path(tmp) / "probe"))
            with serve(make_app(studio)) as url, httpx.Client(base_url=url, timeout=300) as client:
                def api_call(seed: int = 1) -> None:
                    r = client.post("/sdapi/v1/txt2img", json=body(args, seed))
                    r.raise_for_status()

                def engine_call() -> None:
                    studio.generate(request)

                api_call(), engine_call()  # warm up (model load, first allocations)
                t_api, t_engine = [], []
                for _ in range(args.runs):  # interleaved so drift in machine load hits both alike
                    t0 = time.perf_counter(); api_call(); t_api.append(time.perf_counter() - t0)
                    t0 = time.perf_counter(); engine_call(); t_engine.append(time.perf_counter() - t0)
                api, engine = statistics.median(t_api), statistics.median(t_engine)

                # clients live in other processes, as real clients do (threads here would fight the engine
                # for this process's GIL and measure that instead)
                n = args.requests
                singles, concurrents = [], []
                with ProcessPoolExecutor(args.clients, mp_context=multiprocessing.get_context("spawn")) as pool:
                    list(pool.map(post_one, [(url, body(args, i)) for i in range(args.clients)]))  # start them
                    for r in range(args.rounds):  # alternated, so machine-load drift hits both alike
                        t0 = time.perf_counter()
                        images = sum(pool.map(post_many, [(url, [body(args, i) for i in range(n)])]))
                        singles.append(images / (time.perf_counter() - t0))
                        assert images == n, f"{n - images} images lost"
                        t0 = time.perf_counter()
                        images = sum(pool.map(post_one, [(url, body(args, 1000 + i)) for i in range(n)]))
                        concurrents.append(images / (time.perf_counter() - t0))
                        assert images == n, f"{n - images} images lost"
                single, concurrent = statistics.median(singles), statistics.median(concurrents)
                ratio = statistics.median(c / s for c, s in zip(concurrents, singles))
                print("per-round ratios:", " ".join(f"{c / s:.3f}" for c, s in zip(concurrents, singles)))
        finally:
            studio.close()

    rows = [
        ("API round trip / engine call (median s)", f"{api:.4f} / {engine:.4f}", api / engine, "<=1.10",
         api / engine <= 1.10),
        (f"images/s: {args.clients} clients / 1 client", f"{concurrent:.2f} / {single:.2f}", ratio, ">=0.95",
         ratio >= 0.95),
    ]
    print(f"tiny SD1, {args.size}x{args.size}, {args.steps} steps, {args.runs} runs, {args.requests} requests x {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'measure':42} {'values':>20} {'ratio':>7} {'target':>8}  ok")
    for name, values, ratio, target, ok in rows:
        print(f"{name:42} {values:>20} {ratio:7.3f} {target:>8}  {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
