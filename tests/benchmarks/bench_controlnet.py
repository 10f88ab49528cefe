"""ControlNet benchmark (issue [6/9]): two units on the tiny model, package level (the engine recipe).

    python -m tests.benchmarks.bench_controlnet [--runs 5] [--steps 10]

Reports: models loaded and preprocessor runs in the repeated generations (both must be 0), and the median time
per generation with two units / without ControlNet.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from studio.app import Studio  # noqa: E402
from studio.controlnet import (ControlNetLibrary, ControlUnit, default_preprocessors, load_controlnet,  # noqa: E402
                               prepare_control_image)
from studio.controlnet.apply import build_plan, controlnet_pipeline  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tests import controlnets, tinymodels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        (root / "ControlNet").mkdir(parents=True)
        comps = tinymodels.make_tiny("sd1")
        controlnets.write_ldm(controlnets.make_controlnet(comps.unet, 0), root / "ControlNet" / "cn_a.safetensors")
        controlnets.write_diffusers(controlnets.make_controlnet(comps.unet, 1), root / "ControlNet" / "cn_b")
        studio = Studio(Settings(models_dir=str(root), data_dir=f"{tmp}/data", outdir=f"{tmp}/out"))
        lib = ControlNetLibrary(studio.settings, studio.hashes)
        preps = default_preprocessors(studio.settings.annotators_path)
        image = Image.new("RGB", (256, 256), "white")
        ImageDraw.Draw(image).rectangle((64, 64, 191, 191), fill="black")
        unit_dicts = [{"module": "canny", "model": "cn_a", "image": image, "processor_res": 64},
                      {"module": "lineart_standard", "model": "cn_b", "image": image, "processor_res": 64}]
        base = tinymodels.make_pipeline(comps)
        base.set_progress_bar_config(disable=True)

        def call(pipe, **kw):
            g = torch.Generator().manual_seed(1)
            return pipe(prompt="a box", num_inference_steps=args.steps, width=64, height=64, generator=g,
                        output_type="np", **kw).images[0]

        def with_units():
            units = [ControlUnit.from_api(d, i, preps) for i, d in enumerate(unit_dicts)]
            with contextlib.ExitStack() as stack:
                nets = [stack.enter_context(studio.manager.acquire_module(
                    lib.key(info), info.title, lambda info=info: load_controlnet(info.path)[0]))
                    for info in (lib.find(u.model) for u in units)]
                images = [prepare_control_image(u, 64, 64, preps).image for u in units]
                plan = build_plan(units, nets, images, width=64, height=64, guidance_scale=7.5)
                return call(controlnet_pipeline("txt2img", "sd1", base.components, plan.controlnet),
                            **plan.call_kwargs("txt2img"))

        with_units()  # warm: loads both ControlNets and runs both preprocessors
        loads, runs = studio.manager.loads, sum(preps.runs.values())
        timed_cn, timed_plain = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            with_units()
            timed_cn.append(time.perf_counter() - t)
            t = time.perf_counter()
            call(base)
            timed_plain.append(time.perf_counter() - t)
        print(f"models loaded in repeated runs: {studio.manager.loads - loads}")
        print(f"preprocessor runs in repeated runs: {sum(preps.runs.values()) - runs}")
        cn, plain = statistics.median(timed_cn), statistics.median(timed_plain)
        print(f"time per generation: two units {cn:.3f}s, no ControlNet {plain:.3f}s, ratio {cn / plain:.2f}")
        studio.close()


if __name__ == "__main__":
    main()
