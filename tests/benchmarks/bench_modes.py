"""Mode benchmark (issue [4/9]): txt2img / img2img / inpaint / hires share one loaded checkpoint.

    python -m tests.benchmarks.bench_modes [--runs 7]

1. RSS after using txt2img + img2img + inpaint + hires / RSS after txt2img alone;
2. time to switch mode (build the pipeline view for another mode) / time of one generation, medians.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from studio.app import Studio  # noqa: E402
from studio.request import GenerationRequest  # noqa: E402
from studio.samplers import make_scheduler  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tests import tinymodels  # noqa: E402


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        (root / "Stable-diffusion").mkdir(parents=True)
        tinymodels.write_single_file(tinymodels.make_tiny("sd1"), root / "Stable-diffusion" / "tiny.safetensors")
        studio = Studio(Settings(models_dir=str(root), data_dir=f"{tmp}/data", outdir=f"{tmp}/out"))
        base = GenerationRequest(prompt="a house", steps=args.steps, width=64, height=64, seed=1, save_images=False)
        image = Image.new("RGB", (64, 64), (90, 140, 200))
        mask = Image.new("L", (64, 64))
        ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
        requests = {
            "txt2img": base,
            "img2img": base.replace(mode="img2img", init_images=(image,)),
            "inpaint": base.replace(mode="inpaint", init_images=(image,), mask=mask),
            "hires": base.replace(enable_hr=True, hr_scale=2.0),
        }
        for _ in range(3):
            studio.generate(requests["txt2img"])
        after_txt2img = rss()
        for _ in range(3):
            for req in requests.values():
                studio.generate(req)
        after_all = rss()
        gen_times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            studio.generate(requests["txt2img"])
            gen_times.append(time.perf_counter() - t0)
        switch_times = []
        with studio.manager.acquire() as loaded:
            for i in range(args.runs * 10):
                sched, _ = make_scheduler("Euler", "Automatic", loaded.components.scheduler_config)
                t0 = time.perf_counter()
                studio.manager.pipeline(loaded, ("img2img", "inpaint", "txt2img")[i % 3], sched)
                switch_times.append(time.perf_counter() - t0)
        studio.close()
    gen, switch = statistics.median(gen_times), statistics.median(switch_times)
    rows = [("RSS all modes / txt2img alone (MB)", f"{after_all / 2**20:.0f} / {after_txt2img / 2**20:.0f}",
             after_all / after_txt2img, 1.05),
            ("mode switch / one generation (median s)", f"{switch:.5f} / {gen:.3f}", switch / gen, 0.01)]
    print(f"tiny SD1, 64x64, {args.steps} steps, {args.runs} runs")
    print(f"{'measure':42} {'values':>22} {'ratio':>8} {'target':>8}  ok")
    for name, values, ratio, target in rows:
        print(f"{name:42} {values:>22} {ratio:8.4f} {'<=' + str(target):>8}  {'yes' if ratio <= target else 'NO'}")


if __name__ == "__main__":
    main()
