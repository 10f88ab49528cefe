"""Families benchmark (issue [5/6]): run on demand; ratios measured in ONE run, medians.

    python -m tests.benchmarks.bench_families [--runs 5]

1. Per family: studio txt2img time / the bare diffusers pipeline built over the very same modules (same
   weights, prompt, sampler, steps, size, seed): SD 1.x, SDXL and SD3.5 tiny models, and a FLUX.1 dev model of 4 heads,
   2 + 2 blocks (so the transformer dominates). Target <= 1.05.
2. FLUX fp8 (e4m3fn) and GGUF Q8_0: resident set of a process that loaded the file / one that loaded the same
   weights in bf16, each in a fresh process; and the transformer bytes the manager counts. Target <= 0.6.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _flux(seed: int = 0):
    """A FLUX.1 dev model big enough that the transformer dominates a step (inner 512, 2 + 2 blocks)."""
    from diffusers import FluxTransformer2DModel

    from tests.tinyflux import make_tiny_flux
    c = make_tiny_flux(seed=seed)
    torch.manual_seed(seed)
    c.unet = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=64, num_layers=2, num_single_layers=2,
                                    attention_head_dim=128, num_attention_heads=4, joint_attention_dim=64,
                                    pooled_projection_dim=64, guidance_embeds=True,
                                    axes_dims_rope=(16, 56, 56)).eval()
    return c


def _store(root: Path) -> None:
    from tests import tinymodels
    from tests.tinyflux import write_flux_single_file
    ckpt = root / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    tinymodels.write_single_file(tinymodels.make_tiny("sd1", seed=0), ckpt / "sd1.safetensors")
    tinymodels.write_single_file(tinymodels.make_tiny("sdxl", seed=0), ckpt / "sdxl.safetensors")
    from tests.tinysd3 import make_tiny_sd3, write_sd3_single_file
    write_sd3_single_file(make_tiny_sd3(seed=0), ckpt / "sd35.safetensors")
    flux = _flux()
    write_flux_single_file(flux, ckpt / "flux.safetensors")
    from tests.tinyzimage import make_tiny_zimage, write_zimage_single_file
    write_zimage_single_file(make_tiny_zimage(seed=0), ckpt / "zimage.safetensors", all_in_one=True)
    from safetensors.torch import save_file

    from tests.tinyflux import flux_state_dict
    sd = flux_state_dict(flux)
    from studio.loading.ldm_export import vae_to_ldm
    from tests.tinyflux import write_flux_gguf
    write_flux_gguf(flux, root / "flux-Q8_0.gguf")
    (root / "parts").mkdir()
    save_file({k: v.contiguous() for k, v in flux.text_encoder.state_dict().items() if not k.endswith("position_ids")},
              str(root / "parts" / "clip_l.safetensors"))
    save_file({k: v.contiguous() for k, v in flux.text_encoder_2.state_dict().items()
               if k != "encoder.embed_tokens.weight"}, str(root / "parts" / "t5xxl.safetensors"))
    save_file({k: v.contiguous() for k, v in vae_to_ldm(flux.vae.state_dict(), prefix="").items()},
              str(root / "parts" / "ae.safetensors"))
    for name, cast in (("flux-bf16", lambda v: v.to(torch.bfloat16)),
                       ("flux-fp8", lambda v: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.to(torch.bfloat16))):
        save_file({k: (cast(v) if k.startswith("model.diffusion_model.") else v).contiguous() for k, v in sd.items()},
                  str(root / f"{name}.safetensors"))


def _bare(studio, checkpoint: str):
    """diffusers' own pipeline class for the family, over the modules the studio loaded."""
    import diffusers
    with studio.manager.acquire(checkpoint, "Automatic") as loaded:
        c = loaded.components
        studio.manager.ensure_hashes(loaded)   # the first load hashes the file in the background: not timed
    spec = c.spec
    cls = getattr(diffusers, spec.pipeline_class("txt2img"))
    sched, _ = spec.make_scheduler("Euler", "Automatic", c)
    return spec.make_pipeline("txt2img", {**c.text_modules(), "vae": loaded.vae, "unet": c.unet,
                                          "scheduler": sched}), cls


def bench_family(studio, checkpoint: str, size: int, steps: int, runs: int, guidance: str) -> dict:
    """``guidance``: "cfg" (CFG 7 with a negative prompt), "distilled" (FLUX dev: CFG 1, distilled 3.5) or
    "none" (a turbo model's CFG 1)."""
    from studio.request import GenerationRequest
    cfg = guidance == "cfg"
    req = GenerationRequest(prompt="a red circle on a blue square", negative_prompt="blurry" if cfg else "",
                            steps=steps, width=size, height=size, sampler_name="Euler", seed=1, save_images=False,
                            cfg_scale=7.0 if cfg else 1.0, checkpoint=checkpoint)
    pipe, _ = _bare(studio, checkpoint)
    kw = dict(prompt=req.prompt, num_inference_steps=steps, width=size, height=size, output_type="pil")
    if cfg:
        kw["negative_prompt"] = req.negative_prompt
    with studio.manager.acquire(checkpoint, "Automatic") as loaded:   # the guidance arguments the studio passes
        kw.update(loaded.components.spec.guidance_kwargs(req, loaded.components))

    def bare():
        pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
        pipe(generator=torch.Generator().manual_seed(1), **kw)

    def ours():
        studio.generate(req)

    ours(), bare()
    t_ours, t_bare = [], []
    for _ in range(runs):
        for fn, out in ((ours, t_ours), (bare, t_bare)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return {"studio_s": statistics.median(t_ours), "bare_s": statistics.median(t_bare),
            "ratio": statistics.median(a / b for a, b in zip(t_ours, t_bare))}


_PROBE = """
import json, os, sys, psutil
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from studio.loading.single_file import load_single_file
import diffusers, transformers                      # imported before the baseline: only the weights are measured
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel
from diffusers.hooks import apply_layerwise_casting
from studio.loading.tokenizers import load_clip_tokenizer, load_t5_tokenizer
load_clip_tokenizer(), load_t5_tokenizer()          # so are the tokenizers (not weights; the same for both)
before = psutil.Process().memory_info().rss
from pathlib import Path
from studio.loading import companions
parts = companions.find([Path(sys.argv[1]).parent / "parts"])
c = load_single_file(sys.argv[1], dtype=torch.bfloat16, companions=parts)
held = sum(p.numel() * p.element_size() for p in c.unet.parameters())
import ctypes, gc
with torch.no_grad():                               # fault in every page (mapped file pages count once read)
    for m in c.modules().values():
        for p in m.parameters():
            t = p.as_tensor() if hasattr(p, "as_tensor") else p.detach()      # GGUF: its raw bytes
            t.contiguous().view(torch.uint8).max()   # a reduction: no weight-sized temporary
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)             # what the allocator still keeps from reading the file
after = psutil.Process().memory_info().rss
total = c.nbytes()
c.unet = m = p = t = None                           # the transformer's RSS: what the process gives back without it
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"rss": after - before, "model_rss": after - psutil.Process().memory_info().rss, "held": held,
                  "all": total}))
"""


def bench_fp8(root: Path) -> dict:
    out = {}
    for name in ("flux-bf16.safetensors", "flux-fp8.safetensors", "flux-Q8_0.gguf"):
        res = subprocess.run([sys.executable, "-c", _PROBE, str(root / name)], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        out[name.split(".")[0]] = json.loads(res.stdout.strip().splitlines()[-1])
    bf, f8, q8 = out["flux-bf16"], out["flux-fp8"], out["flux-Q8_0"]
    return {"transformer_bytes_ratio": f8["held"] / bf["held"], "model_rss_ratio": f8["model_rss"] / bf["model_rss"],
            "process_rss_ratio": f8["rss"] / bf["rss"], "q8_bytes_ratio": q8["held"] / bf["held"],
            "q8_rss_ratio": q8["model_rss"] / bf["model_rss"], "q8_process_rss_ratio": q8["rss"] / bf["rss"],
            "bf16": bf, "fp8": f8}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="", help="rows whose name contains this (e.g. flux); the memory probe "
                                               "runs only without it")
    args = ap.parse_args()
    from studio.app import Studio
    from studio.settings import Settings
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _store(root)
        studio = Studio(Settings(models_dir=str(root), data_dir=str(root / "data"), outdir=str(root / "out"),
                                 default_checkpoint="sd1.safetensors", preview_every=0), load_extensions=False)
        try:
            plan = {"sd1 (64 px, 20 steps)": ("sd1.safetensors", 64, 20, "cfg"),
                    "sdxl (64 px, 20 steps)": ("sdxl.safetensors", 64, 20, "cfg"),
                    "sd3.5 (64 px, 20 steps)": ("sd35.safetensors", 64, 20, "cfg"),
                    "flux dev (128 px, 8 steps)": ("flux.safetensors", 128, 8, "distilled"),
                    "z-image turbo (64 px, 9 steps)": ("zimage.safetensors", 64, 9, "none")}
            rows = {name: bench_family(studio, ckpt, size, steps, args.runs, guidance)
                    for name, (ckpt, size, steps, guidance) in plan.items() if args.only in name}
        finally:
            studio.close()
        fp8 = None if args.only else bench_fp8(root)
    print(f"{'family':28} {'studio s':>9} {'bare s':>9} {'ratio':>7}   (median of {args.runs})")
    for name, r in rows.items():
        print(f"{name:28} {r['studio_s']:9.3f} {r['bare_s']:9.3f} {r['ratio']:7.3f}")
    if fp8 is None:
        return
    bf, f8 = fp8["bf16"], fp8["fp8"]
    print(f"FLUX fp8 / bf16: transformer bytes {fp8['transformer_bytes_ratio']:.3f}; transformer RSS "
          f"{fp8['model_rss_ratio']:.3f} ({f8['model_rss'] >> 20} / {bf['model_rss'] >> 20} MiB); whole-process RSS "
          f"after load {fp8['process_rss_ratio']:.3f} (bf16 {bf['rss'] >> 20} MiB for {bf['all'] >> 20} MiB of "
          f"weights, fp8 {f8['rss'] >> 20} MiB for {f8['all'] >> 20} MiB; both hold the same bf16 text encoders "
          "and VAE)")
    print(f"FLUX GGUF Q8_0 / bf16: transformer bytes {fp8['q8_bytes_ratio']:.3f}; transformer RSS "
          f"{fp8['q8_rss_ratio']:.3f}; whole-process RSS after load {fp8['q8_process_rss_ratio']:.3f}")

if __name__ == "__main__":
    main()
