"""Speed options against bare diffusers (issue [6/6]): run on demand, prints ratios measured in ONE run (medians).

    python -m tests.benchmarks.bench_speed [--runs 5]

Models: the trained demo model (64 px, 20 steps DPM++ 2M Karras, CFG 7, as the effect tests draw) and a mid-size
SD1-layout UNet built in code (four levels, 8 heads, 2 layers per block; 256 px, so the UNet dominates). For each
option: studio time / diffusers' StableDiffusionPipeline over the same modules. Quality on the demo model: the
scorer's colour and shape adherence over the effect tests' grid (6 prompts x ``--seeds`` seeds), with and without.
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

import torch  # noqa: E402

OPTIONS = {"studio": {}, "deepcache 2": {"deepcache_interval": 2}, "deepcache 3": {"deepcache_interval": 3},
           "int8": {"quantize": "int8"},
           "onnx": {"onnx_runtime": True},      # UNet + VAE on onnxruntime (CPU provider here) from the export
           "channels last": {"channels_last": True}, "fused qkv": {"fused_qkv": True},
           "sdpa math": {"sdpa_backend": "math"},
           "dc3+fused+cl": {"deepcache_interval": 3, "fused_qkv": True, "channels_last": True}}
# 8 jobs waiting together with dynamic batching: the time of the 8 / 8 (per image), without and with DeepCache 3
BATCHED = {"queue 8": {}, "queue 8+dc3": {"deepcache_interval": 3}}


def _mid_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    from tests.tinymodels import TEXT_DIM, _jitter
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(128, 256, 384, 384), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=TEXT_DIM,
        attention_head_dim=8, norm_num_groups=32)
    return _jitter(unet, seed)


def _store(root: Path) -> None:
    from studio.demo import install_demo_model
    from studio.settings import Settings
    from tests import tinymodels
    install_demo_model(Settings(models_dir=str(root)))
    mid = tinymodels.make_tiny("sd1", seed=0)
    mid.unet = _mid_unet().eval()
    tinymodels.write_single_file(mid, root / "Stable-diffusion" / "mid-sd1.safetensors")


def bench_studio(root: Path):
    """A studio over the demo model and the mid-size SD1 model, stored in ``root``; no previews."""
    from studio.app import Studio
    from studio.demo import TRAINED_NAME
    from studio.settings import Settings
    _store(root)
    return Studio(Settings(models_dir=str(root), data_dir=str(root / "data"), outdir=str(root / "out"),
                           default_checkpoint=TRAINED_NAME, preview_every=0), load_extensions=False)


def _bare(studio, checkpoint: str):
    from diffusers import StableDiffusionPipeline
    with studio.manager.acquire(checkpoint, "Automatic") as loaded:
        c = loaded.components
        studio.manager.ensure_hashes(loaded)
    sched, _ = c.spec.make_scheduler("DPM++ 2M", "Karras", c)
    pipe = StableDiffusionPipeline(vae=loaded.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_model(studio, checkpoint: str, size: int, steps: int, runs: int) -> dict[str, float]:
    from studio.request import GenerationRequest
    req = GenerationRequest(prompt="a red circle on a blue background", negative_prompt="", steps=steps,
                            width=size, height=size, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=7.0,
                            seed=1, save_images=False, checkpoint=checkpoint)
    pipe = _bare(studio, checkpoint)

    def bare():
        pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
        pipe(prompt=req.prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=7.0, width=size,
             height=size, generator=[torch.Generator().manual_seed(1)], output_type="pil")

    def option(changes: dict):
        def run():
            for k, v in changes.items():
                setattr(studio.settings, k, v)
            try:
                studio.generate(req)
            finally:
                for k in changes:
                    setattr(studio.settings, k, getattr(type(studio.settings)(), k))
        return run

    def batched(changes: dict):
        def run():
            from tests.benchmarks.bench_queue import JOBS
            release = threading.Event()
            for k, v in {**changes, "queue_batch": JOBS}.items():
                setattr(studio.settings, k, v)
            try:
                hold = studio.queue.submit(lambda ctx: release.wait(600), kind="bench-hold")
                jobs = [studio.submit(req.replace(seed=1 + i)) for i in range(JOBS)]
                t = time.perf_counter()
                release.set()
                hold.wait(60)
                for job in jobs:
                    job.wait(600)
                return (time.perf_counter() - t) / JOBS     # per image
            finally:
                for k in {**changes, "queue_batch": 1}:
                    setattr(studio.settings, k, getattr(type(studio.settings)(), k))
        return run

    fns = {"bare diffusers": bare, **{name: option(ch) for name, ch in OPTIONS.items()},
           **{name: batched(ch) for name, ch in BATCHED.items()}}
    for fn in fns.values():
        fn()                                    # warm-up: first-call allocations, lazy imports
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):                       # interleaved, so a busy spell hits every option alike
        for name, fn in fns.items():
            t = time.perf_counter()
            own = fn()             # the batched rows time themselves (per image)
            times[name].append(own if own is not None else time.perf_counter() - t)
    base = times["bare diffusers"]
    return {name: statistics.median(a / b for a, b in zip(t, base)) for name, t in times.items()}


def unet_bytes(studio, checkpoint: str) -> dict[str, int]:
    """Resident bytes of the checkpoint's UNet as loaded without and with ``quantize=int8``."""
    from studio.quantize import module_bytes
    out = {}
    for mode in ("none", "int8"):
        studio.settings.quantize = mode
        try:
            with studio.manager.acquire(checkpoint, "Automatic") as loaded:
                out[mode] = module_bytes(loaded.components.unet)
        finally:
            studio.settings.quantize = "none"
    return out


def quality(studio, per_prompt: int) -> dict[str, tuple[float, float]]:
    """(colour %, shape %) on the demo model per option, over the grid's 6 prompts x ``per_prompt`` seeds."""
    from tests.effects.effects import draw, score
    from tests.effects.test_txt2img_effects import GRID
    out = {}
    for name, changes in OPTIONS.items():
        for k, v in changes.items():
            setattr(studio.settings, k, v)
        colour = shape = n = 0
        try:
            for k, (c, s, bg) in enumerate(GRID):
                seeds = list(range(500 + per_prompt * k, 500 + per_prompt * (k + 1)))
                for sc in map(score, draw(studio, f"a {c} {s} on a {bg} background", seeds)):
                    colour, shape, n = colour + (sc.colour == c), shape + (sc.shape == s), n + 1
        finally:
            for k in changes:
                setattr(studio.settings, k, getattr(type(studio.settings)(), k))
        out[name] = (100 * colour / n, 100 * shape / n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=8, help="seeds per prompt of the quality grid (6 prompts)")
    ap.add_argument("--only-quality", action="store_true")
    ap.add_argument("--options", default="", help="comma-separated option names to run (default: all)")
    ap.add_argument("--skip-mid", action="store_true", help="time the demo model only")
    args = ap.parse_args()
    if args.options:
        wanted = set(args.options.split(","))
        for table in (OPTIONS, BATCHED):
            for name in [n for n in table if n not in wanted]:
                del table[name]
    from studio.demo import TRAINED_NAME
    with tempfile.TemporaryDirectory() as tmp:
        studio = bench_studio(Path(tmp))
        try:
            from studio.onnx.export import export_checkpoint
            models = [TRAINED_NAME] + ([] if args.skip_mid else ["mid-sd1.safetensors"])
            for name in models if "onnx" in OPTIONS else []:      # what the "onnx" option runs on
                out = export_checkpoint(studio, name)
                print(f"ONNX export of {name}: {out.seconds:.1f} s, {out.total_bytes / 1e6:.1f} MB")
            rows = {} if args.only_quality else {
                "demo model (64 px, 20 steps)": bench_model(studio, TRAINED_NAME, 64, 20, args.runs)}
            if not (args.only_quality or args.skip_mid):
                rows["mid-size SD1 UNet (256 px, 20 steps)"] = bench_model(studio, "mid-sd1.safetensors", 256, 20,
                                                                           args.runs)
            sizes = {} if args.only_quality or "int8" not in OPTIONS else {
                name: unet_bytes(studio, ckpt) for name, ckpt in (("demo model", TRAINED_NAME),
                                                                  ("mid-size SD1 UNet", "mid-sd1.safetensors"))}
            scores = quality(studio, args.seeds)
        finally:
            studio.close()
    if rows:
        names = list(next(iter(rows.values())))
        print(f"time / bare diffusers, median of {args.runs} (one run)")
        print(f"{'model':40}" + "".join(f"{n:>16}" for n in names))
        for model, r in rows.items():
            print(f"{model:40}" + "".join(f"{r[n]:16.3f}" for n in names))
    for name, b in sizes.items():
        print(f"UNet resident bytes, {name}: {b['none'] / 2**20:.1f} MB float, {b['int8'] / 2**20:.1f} MB int8 "
              f"({b['int8'] / b['none']:.2f})")
    print(f"demo scorer adherence over {6 * args.seeds} pictures (colour % / shape %):")
    for name, (c, s) in scores.items():
        print(f"  {name:14} {c:5.1f} / {s:5.1f}")


if __name__ == "__main__":
    main()
