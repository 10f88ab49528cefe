"""LoRA benchmark (issue [5/9]), one run on the tiny SD1 model:

    python -m tests.benchmarks.bench_networks [--runs 7]

1. time per generation with 3 active LoRAs / without (weights are patched, so steps cost the same);
2. re-activating a cached LoRA set / first activation from disk;
3. text-encoder runs of a second job with the same prompt (target 0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio.adapters import patcher_for  # noqa: E402
from studio.app import Studio  # noqa: E402
from studio.request import GenerationRequest  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tests import lorafiles, tinymodels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        sd1 = tinymodels.make_tiny("sd1", seed=0)
        tinymodels.write_single_file(sd1, root / "Stable-diffusion" / "tiny.safetensors")
        for i in range(3):
            sd, _ = lorafiles.kohya_lora(sd1, seed=i, rank=8)
            lorafiles.write(root / "Lora" / f"l{i}.safetensors", sd, lorafiles.metadata_for(sd1))
        studio = Studio(Settings(models_dir=str(root), data_dir=f"{tmp}/data", outdir=f"{tmp}/out"))
        base = GenerationRequest(prompt="a castle", steps=args.steps, width=64, height=64, seed=1,
                                 save_images=False)
        with_loras = base.replace(prompt="a castle <lora:l0:0.8> <lora:l1:0.5> <lora:l2:-0.3>")
        studio.generate(base), studio.generate(with_loras)   # warm up both paths
        # per-step cost: time every UNet call (the sampling step) with and without the LoRA set patched in
        step_times: list[float] = []
        with studio.manager.acquire() as loaded:
            unet = loaded.components.unet
        pre = unet.register_forward_pre_hook(lambda m, a: step_times.append(-time.perf_counter()))
        post = unet.register_forward_hook(lambda m, a, o: step_times.__setitem__(-1, step_times[-1] + time.perf_counter()))
        step_plain, step_lora = [], []
        for _ in range(args.runs):
            step_times.clear(); studio.generate(with_loras); step_lora += step_times
            step_times.clear(); studio.generate(base); step_plain += step_times
        pre.remove(), post.remove()
        plain_t, lora_t = [], []
        for _ in range(args.runs):  # interleaved; the LoRA set stays patched between its jobs only if
            # nothing else ran, so alternate prompts with the same set to measure steady-state cost
            t0 = time.perf_counter(); studio.generate(with_loras); lora_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); studio.generate(with_loras.replace(seed=2)); lora_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); studio.generate(base); plain_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); studio.generate(base.replace(seed=2)); plain_t.append(time.perf_counter() - t0)

        # activation cost: first from disk (fresh library cache) vs re-activating the cached set
        tags = [("l0", 0.8, 0.8), ("l1", 0.5, 0.5), ("l2", -0.3, -0.3)]
        first, cached = [], []
        with studio.manager.acquire() as loaded:
            patcher = patcher_for(loaded.components)
            for _ in range(args.runs):
                studio.loras.refresh()
                studio.loras._cache.clear()  # forget parsed files: the next activation reads them again
                patcher.restore()
                patcher._sets.clear()
                t0 = time.perf_counter()
                active, _ = studio.loras.resolve(tags)
                patcher.apply(active)
                first.append(time.perf_counter() - t0)
                patcher.apply([])
                t0 = time.perf_counter()
                active, _ = studio.loras.resolve(tags)
                patcher.apply(active)
                cached.append(time.perf_counter() - t0)
                patcher.apply([])

        runs_before = studio.prompts.encoder_runs
        studio.generate(base.replace(seed=99))
        te_runs = studio.prompts.encoder_runs - runs_before
        studio.close()
    p, l_ = statistics.median(plain_t), statistics.median(lora_t)
    f, c = statistics.median(first), statistics.median(cached)
    sp, sl = statistics.median(step_plain), statistics.median(step_lora)
    rows = [("step time with 3 LoRAs / without (median s)", f"{sl:.4f} / {sp:.4f}", sl / sp, "<=1.03"),
            ("whole generation with 3 LoRAs / without (s)", f"{l_:.3f} / {p:.3f}", l_ / p, "~1"),
            ("re-activate cached set / first activation (s)", f"{c:.4f} / {f:.4f}", c / f, "<=0.1"),
            ("text-encoder runs, 2nd job same prompt", f"{te_runs}", float(te_runs), "==0")]
    print(f"tiny SD1, 64x64, {args.steps} steps, {args.runs} runs")
    print(f"{'measure':48} {'values':>20} {'ratio':>8} {'target':>8}")
    for name, values, ratio, target in rows:
        print(f"{name:48} {values:>20} {ratio:8.3f} {target:>8}")


if __name__ == "__main__":
    main()
