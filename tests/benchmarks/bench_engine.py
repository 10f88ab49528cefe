"""Engine benchmark (issue [1/9]): run on demand, prints a table of ratios measured in ONE run.

    python -m tests.benchmarks.bench_engine [--runs 7]

1. studio txt2img time / bare diffusers pipeline time (same tiny SD1 weights and settings), median;
2. switch back to a cached checkpoint / cold load of it;
3. RSS after 30 switches among 3 checkpoints with a 2-checkpoint budget / RSS after the first 3 loads.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from studio.app import Studio  # noqa: E402
from studio.request import GenerationRequest  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tests import tinymodels  # noqa: E402


def rss() -> int:
    return psutil.Process().memory_info().rss


def build_store(root: Path) -> None:
    ckpt = root / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    for i, name in enumerate(("a", "b", "c")):
        tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=i), ckpt / f"tiny-{name}.safetensors")
    tinymodels.write_diffusers_folder(tinymodels.make_tiny("sd1", seed=0), root / "diffusers-a")


def bench_generation(studio: Studio, root: Path, runs: int, steps: int, size: int) -> tuple[float, float]:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    request = GenerationRequest(prompt="a castle on a hill", negative_prompt="blurry", steps=steps, width=size,
                                height=size, sampler_name="DPM++ 2M", seed=1, save_images=False,
                                checkpoint="tiny-a.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(root / "diffusers-a", local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def bare() -> None:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=steps,
             guidance_scale=7.0, width=size, height=size, generator=[torch.Generator().manual_seed(1)])

    def ours() -> None:
        studio.generate(request)

    ours(), bare()  # warm up both (first-call allocations, lazy imports)
    t_ours, t_bare = [], []
    for _ in range(runs):  # interleaved so drift in machine load hits both alike
        t0 = time.perf_counter(); ours(); t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); bare(); t_bare.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_bare)


def bench_switch(studio: Studio, runs: int) -> tuple[float, float]:
    cold, warm = [], []
    for _ in range(runs):
        studio.manager.unload_all()
        t0 = time.perf_counter(); studio.switch_checkpoint("tiny-a.safetensors"); cold.append(time.perf_counter() - t0)
        studio.switch_checkpoint("tiny-b.safetensors")
        t0 = time.perf_counter(); studio.switch_checkpoint("tiny-a.safetensors"); warm.append(time.perf_counter() - t0)
    return statistics.median(warm), statistics.median(cold)


def bench_rss(settings: Settings) -> tuple[int, int]:
    probe = Studio(settings)
    probe.switch_checkpoint("tiny-a.safetensors")
    size = probe.manager.stats()["entries"][0]["bytes"]
    probe.close()
    budget_mb = (2 * size + size // 2) // 2**20 + 1  # room for two checkpoints, not three
    studio = Studio(settings.replace(ram_budget_mb=budget_mb, vram_budget_mb=budget_mb))
    names = ["tiny-a.safetensors", "tiny-b.safetensors", "tiny-c.safetensors"]
    for name in names:
        studio.switch_checkpoint(name)
    after_three = rss()
    for i in range(30):
        studio.switch_checkpoint(names[i % 3])
    after_thirty = rss()
    studio.close()
    return after_thirty, after_three


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        build_store(root)
        settings = Settings(models_dir=str(root), data_dir=str(Path(tmp) / "data"), outdir=str(Path(tmp) / "out"))
        rss_after, rss_first = bench_rss(settings)
        studio = Studio(settings)
        ours, bare = bench_generation(studio, root, args.runs, args.steps, args.size)
        warm, cold = bench_switch(studio, args.runs)
        studio.close()
    rows = [
        ("studio txt2img / bare diffusers (median s)", f"{ours:.4f} / {bare:.4f}", ours / bare, 1.05),
        ("switch to cached / cold load (median s)", f"{warm:.5f} / {cold:.4f}", warm / cold, 0.05),
        ("RSS after 30 switches / after 3 loads (MB)", f"{rss_after / 2**20:.0f} / {rss_first / 2**20:.0f}",
         rss_after / rss_first, 1.05),
    ]
    print(f"tiny SD1, {args.size}x{args.size}, {args.steps} steps, {args.runs} runs, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'measure':46} {'values':>22} {'ratio':>8} {'target':>8}  ok")
    for name, values, ratio, target in rows:
        print(f"{name:46} {values:>22} {ratio:8.3f} {'<=' + str(target):>8}  {'yes' if ratio <= target else 'NO'}")


if __name__ == "__main__":
    main()
