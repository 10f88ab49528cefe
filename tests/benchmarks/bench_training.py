"""Training benchmark (issue [7/9]): run on demand, prints ratios measured in ONE run.

    python -m tests.benchmarks.bench_training [--steps 30] [--images 8] [--batch 2] [--rounds 2]
    python -m tests.benchmarks.bench_training --quality --steps 4000 [--every 250]
    python -m tests.benchmarks.bench_training --controlnet [--steps 30] [--batch 2] [--rounds 2]

Same tiny SD1 model, same 8 synthetic 64x64 images, same batch size, rank, optimizer (AdamW), lr and steps:
1. our trainer's steps/s (``studio.training.Trainer``, latent + text-embedding caching; LoRA on the same
   attention layers, or with ``--targets transformer`` kohya's larger set) / a plain reference loop written the way diffusers'
   ``train_text_to_image_lora.py`` does it (peft LoRA on to_q/to_k/to_v/to_out.0 via ``unet.add_adapter``,
   VAE encode + text encode every step, accelerate); target >= 1.0. Each side times its training loop only
   (ours includes the up-front latent caching; model loading is excluded from both).
2. peak RSS ours / reference, each in its own fresh process; target <= 1.0.
3. VAE encodes per image with latent caching on; target 1.0.
Each side runs in its own subprocess, alternated ``--rounds`` times; the medians are reported.
With ``--controlnet`` 1-3 compare ControlNet training instead: ours (method "controlnet", paired conditions) /
the loop of diffusers' ``train_controlnet.py`` (``ControlNetModel.from_unet``, VAE + text encoding every step).
4. ``--quality``: steps to reach 70 % concept adherence on the held-out heart (demo model, Train tab defaults) / the
   same reference loop with the same settings; target <= 1.0 (see ``quality``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _setup(root: Path, n_images: int) -> tuple[Path, Path]:
    from tests import tinymodels
    from tests.training.conftest import write_dataset
    ckpt = root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors"
    if not ckpt.exists():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=0), ckpt)
    ds = root / "dataset"
    if not ds.exists():
        write_dataset(ds, n_images)
        _conditions(ds)
    return ckpt, ds


def _conditions(ds: Path) -> None:
    """``conditioning/<name>.png``: each image's canny map (the pairs both ControlNet trainers read)."""
    import cv2
    import numpy as np
    from PIL import Image
    (ds / "conditioning").mkdir()
    for f in sorted(ds.glob("*.png")):
        grey = np.asarray(Image.open(f).convert("L"))
        Image.fromarray(cv2.Canny(grey, 100, 200)).convert("RGB").save(ds / "conditioning" / f.name)


def run_ours(root: Path, args) -> dict:
    from studio.training import TrainConfig
    from studio.training.trainer import Trainer
    ckpt, ds = _setup(root, args.images)
    marks = {}

    def on_event(e):
        if e["type"] in ("start", "step"):
            marks.setdefault(e["type"], time.perf_counter())
            marks["last"] = time.perf_counter()
    method = {"method": "controlnet", "conditioning": "folder"} if args.controlnet else {}
    cfg = TrainConfig(base_model=str(ckpt), dataset_dir=str(ds), resolution=64, min_image_side=32, rank=4, alpha=4.0,
                      learning_rate=1e-4, max_steps=args.steps, batch_size=args.batch, seed=0,
                      output_name="bench", run_dir=str(root / "run-ours"), cache_latents="ram",
                      unet_targets=args.targets, **method)
    t = Trainer(cfg, on_event=on_event)
    result = t.run()
    return {"steps_per_s": args.steps / (marks["last"] - marks["start"]), "vae_encodes": result.vae_encodes,
            "images": args.images}


def run_reference(root: Path, args) -> dict:
    """diffusers' train_text_to_image_lora.py, reduced to its training loop."""
    ckpt, ds = _setup(root, args.images)
    if args.controlnet:
        out = reference_controlnet_loop(ckpt, sorted(ds.glob("*.png")), steps=args.steps, batch=args.batch, lr=1e-4)
        return {"steps_per_s": args.steps / out["seconds"], "vae_encodes": out["encodes"], "images": args.images}
    out = reference_loop(ckpt, sorted(ds.glob("*.png")), steps=args.steps, batch=args.batch, lr=1e-4, rank=4,
                         alpha=4)
    return {"steps_per_s": args.steps / out["seconds"], "vae_encodes": out["encodes"], "images": args.images}


def _example_batch(c, noise_sched, pixels: list, captions: list[str]):
    """What diffusers' examples do every step: VAE-encode (a sample of the posterior), noise, text-encode."""
    import torch
    latents = c.vae.encode(torch.stack(pixels)).latent_dist.sample() * c.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(pixels),)).long()
    ids = c.tokenizer(captions, max_length=c.tokenizer.model_max_length, padding="max_length", truncation=True,
                      return_tensors="pt").input_ids
    return noise_sched.add_noise(latents, noise, t), noise, t, c.text_encoder(ids, return_dict=False)[0]


def reference_loop(ckpt: Path, files: list[Path], *, steps: int, batch: int, lr: float, rank: int, alpha: float,
                   save_every: int = 0, out_dir: Path | None = None, seed: int = 0) -> dict:
    """The training loop of diffusers' train_text_to_image_lora.py (peft LoRA on to_q/to_k/to_v/to_out.0 via
    ``unet.add_adapter``, VAE and text encoding every step, accelerate, AdamW, constant lr, grad clip 1.0).
    With ``save_every`` it writes the LoRA as the example does (``save_lora_weights``) into ``out_dir``."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from studio.loading.single_file import load_single_file
    torch.manual_seed(seed)
    acc = Accelerator(gradient_accumulation_steps=1, mixed_precision="no", cpu=True)
    c = load_single_file(str(ckpt))
    unet, vae, te = c.unet, c.vae, c.text_encoder
    for m in (unet, vae, te):
        m.requires_grad_(False)
    lora = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                      target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.add_adapter(lora)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = get_scheduler("constant", opt, num_warmup_steps=0, num_training_steps=steps)
    noise_sched = DDPMScheduler.from_config(c.scheduler_config)
    pixels = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
              for f in files]
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    unet, opt, sched = acc.prepare(unet, opt, sched)
    unet.train()
    encodes, step, saved, elapsed = 0, 0, [], 0.0
    t0 = time.perf_counter()
    while step < steps:
        order = torch.randperm(len(files)).tolist()
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            with acc.accumulate(unet):
                noisy, noise, t, hidden = _example_batch(c, noise_sched, [pixels[j] for j in idx],
                                                         [captions[j] for j in idx])
                encodes += len(idx)
                pred = unet(noisy, t, hidden, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
            if acc.sync_gradients:
                step += 1
                if save_every and step % save_every == 0:
                    elapsed += time.perf_counter() - t0
                    dest = out_dir / f"ref-{step:06d}.safetensors"
                    StableDiffusionPipeline.save_lora_weights(
                        out_dir, unet_lora_layers=get_peft_model_state_dict(acc.unwrap_model(unet)),
                        unet_lora_adapter_metadata=lora.to_dict(), weight_name=dest.name)
                    saved.append(dest)
                    t0 = time.perf_counter()
                if step >= steps:
                    break
    elapsed += time.perf_counter() - t0
    return {"seconds": elapsed, "encodes": encodes, "saved": saved}


def reference_controlnet_loop(ckpt: Path, files: list[Path], *, steps: int, batch: int, lr: float,
                              seed: int = 0) -> dict:
    """The training loop of diffusers' train_controlnet.py: ``ControlNetModel.from_unet``, VAE and text encoding
    every step, the ControlNet's residuals into the frozen UNet, AdamW on the ControlNet, constant lr, clip 1.0."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import ControlNetModel, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from studio.loading.single_file import load_single_file
    torch.manual_seed(seed)
    acc = Accelerator(gradient_accumulation_steps=1, mixed_precision="no", cpu=True)
    c = load_single_file(str(ckpt))
    unet, vae, te = c.unet, c.vae, c.text_encoder
    for m in (unet, vae, te):
        m.requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet)
    controlnet.train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=1e-2)
    sched = get_scheduler("constant", opt, num_warmup_steps=0, num_training_steps=steps)
    noise_sched = DDPMScheduler.from_config(c.scheduler_config)

    def tensor(f, scale):
        return torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / scale
    pixels = [tensor(f, 127.5) - 1 for f in files]
    conds = [tensor(f.parent / "conditioning" / f.name, 255.0) for f in files]
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    controlnet, opt, sched = acc.prepare(controlnet, opt, sched)
    encodes, step = 0, 0
    t0 = time.perf_counter()
    while step < steps:
        order = torch.randperm(len(files)).tolist()
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            with acc.accumulate(controlnet):
                noisy, noise, t, hidden = _example_batch(c, noise_sched, [pixels[j] for j in idx],
                                                         [captions[j] for j in idx])
                encodes += len(idx)
                down, mid = controlnet(noisy, t, encoder_hidden_states=hidden,
                                       controlnet_cond=torch.stack([conds[j] for j in idx]), return_dict=False)
                pred = unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(controlnet.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
            if acc.sync_gradients:
                step += 1
                if step >= steps:
                    break
    return {"seconds": time.perf_counter() - t0, "encodes": encodes}


def quality(args) -> None:
    """Steps to reach 70 % concept adherence: the Train tab's defaults vs the reference loop with the same
    settings (lr, batch, rank, alpha, optimizer, constant schedule), both on the example dataset of the held-out
    heart over the trained demo model; each saved LoRA scored over 20 seeds by the demo world's scorer."""
    import torch
    from studio.app import Studio
    from studio.demo import TRAINED_NAME, install_demo_model
    from studio.demo_world import score, write_example_dataset
    from studio.request import GenerationRequest
    from studio.settings import Settings
    from studio.training import TrainConfig
    from studio.training.trainer import Trainer
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    settings = Settings(models_dir=str(root / "models"), data_dir=str(root / "data"), outdir=str(root / "out"),
                        default_checkpoint=TRAINED_NAME, save_images=False)
    ckpt = install_demo_model(settings)
    ds = root / "dataset"
    write_example_dataset(ds, "heart", count=16, trigger="zkw", repeats=10)
    lora_dir = root / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    tab = TrainConfig()        # the Train tab's form starts from these values
    cfg = TrainConfig(base_model=str(ckpt), dataset_dir=str(ds), resolution=64, min_image_side=32,
                      max_steps=args.steps, save_every=args.every, output_name="ours", output_dir=str(lora_dir),
                      run_dir=str(root / "run"), sample_at_start=False)
    t = time.perf_counter()
    Trainer(cfg, on_event=lambda e: None).run()
    ours_s = time.perf_counter() - t
    ref = reference_loop(ckpt, sorted(ds.rglob("*.png")), steps=args.steps, batch=tab.batch_size,
                         lr=tab.learning_rate, rank=tab.rank, alpha=tab.alpha, save_every=args.every,
                         out_dir=lora_dir, seed=cfg.seed)
    studio = Studio(settings, load_extensions=False)

    def rate(name: str) -> float:
        req = GenerationRequest(prompt=f"zkw, a red heart on a blue background <lora:{name}:1>", seed=100,
                                steps=20, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=7.0, width=64,
                                height=64, batch_size=5, n_iter=4, save_images=False)
        return sum(score(im).shape == "heart" for im in studio.generate(req).images) / 20

    curves = {"ours": [], "reference": []}
    try:
        for step in range(args.every, args.steps + 1, args.every):
            ours_name = "ours" if step == args.steps else f"ours-{step:06d}"
            curves["ours"].append((step, rate(ours_name)))
            curves["reference"].append((step, rate(f"ref-{step:06d}")))
    finally:
        studio.close()

    def reached(curve):
        return next((s for s, r in curve if r >= 0.7), None)
    print(f"quality: Train tab defaults (lr {tab.learning_rate:g}, batch {tab.batch_size}, rank {tab.rank}, "
          f"alpha {tab.alpha:g}, {tab.optimizer}, {tab.lr_scheduler}; ours targets {tab.unet_targets}, reference "
          f"to_q/k/v/out) on 16 heart pictures, 20 seeds per point")
    print(f"{'step':>6}{'ours':>8}{'reference':>11}")
    for (s_, a), (_, b) in zip(curves["ours"], curves["reference"]):
        print(f"{s_:>6}{a:>8.0%}{b:>11.0%}")
    ours_n, ref_n = reached(curves["ours"]), reached(curves["reference"])
    ratio = f"{ours_n / ref_n:.2f}" if ours_n and ref_n else "n/a"
    print(f"steps to 70 %: ours {ours_n or f'> {args.steps}'}, reference {ref_n or f'> {args.steps}'}, "
          f"ratio {ratio} (target <= 1.0); training time ours {ours_s:.0f} s, reference {ref['seconds']:.0f} s")


def _child(which: str, root: Path, args) -> dict:
    out = (run_ours if which == "ours" else run_reference)(root, args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--targets", choices=("attention", "transformer"), default="attention",
                   help="our LoRA targets: attention = the reference's set (same settings); transformer = kohya's")
    p.add_argument("--quality", action="store_true",
                   help="steps to 70 %% concept adherence (demo model, held-out heart) instead of speed")
    p.add_argument("--every", type=int, default=250, help="--quality: steps between scored LoRAs")
    p.add_argument("--controlnet", action="store_true", help="compare ControlNet training instead of LoRA")
    p.add_argument("--child", choices=("ours", "ref"))
    p.add_argument("--root")
    args = p.parse_args()
    if args.quality:
        if args.steps % args.every:
            p.error("--steps must be a multiple of --every")
        return quality(args)
    if args.child:
        import torch
        torch.set_num_threads(1)   # both sides alike, and fair to other processes on a shared machine
        print("RESULT " + json.dumps(_child(args.child, Path(args.root), args)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    _setup(root, args.images)
    runs: dict[str, list[dict]] = {"ours": [], "ref": []}
    for _ in range(args.rounds):
        for which in ("ref", "ours"):
            cmd = [sys.executable, "-m", "tests.benchmarks.bench_training", "--child", which, "--root", str(root),
                   "--steps", str(args.steps), "--images", str(args.images), "--batch", str(args.batch),
                   "--targets", args.targets] + (["--controlnet"] if args.controlnet else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[which].append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))

    def med(which, key):
        return statistics.median(r[key] for r in runs[which])
    speed = med("ours", "steps_per_s") / med("ref", "steps_per_s")
    rss = med("ours", "peak_rss_mb") / med("ref", "peak_rss_mb")
    per_image = runs["ours"][-1]["vae_encodes"] / args.images
    print(f"{'ControlNet' if args.controlnet else 'LoRA'} steps={args.steps} images={args.images} "
          f"batch={args.batch} rounds={args.rounds}" + ("" if args.controlnet else f" our targets={args.targets}"))
    print(f"{'':28}{'ours':>10}{'reference':>12}{'ratio':>8}  target")
    print(f"{'steps/s':28}{med('ours', 'steps_per_s'):10.2f}{med('ref', 'steps_per_s'):12.2f}{speed:8.2f}  >= 1.0")
    print(f"{'peak RSS (MiB)':28}{med('ours', 'peak_rss_mb'):10.0f}{med('ref', 'peak_rss_mb'):12.0f}{rss:8.2f}  <= 1.0")
    print(f"{'VAE encodes per image':28}{per_image:10.2f}{runs['ref'][-1]['vae_encodes'] / args.images:12.2f}"
          f"{'':8}  ours == 1.0")


if __name__ == "__main__":
    main()
