"""Memory at real size (issue 15, items 10-12): SD1.5-size random checkpoints on the CPU.

    python -m tests.benchmarks.bench_memory [--quick] [--runs 5] [--tmp /tmp]

Two fp16 LDM single files (~2.1 GB each; ``--quick``: half widths, ~0.55 GB) and a rank-32 kohya LoRA over every
UNet / text-encoder layer are written by a child process with the studio's own writer (seeded), so this
process's RSS holds only what the studio loads. Models load as fp16 (``precision=fp16``), so a loaded model is
the size of its file, as on a GPU. Measured in one run (medians where repeated):

1. a switch past the budget (budget fits one model): peak RSS growth during the switch and the new model's
   first read of its weights (psutil, every 10 ms), against one model and the budget; and the same switch
   with the room made only after loading (the behaviour before sizes were read from the headers); both again
   at fp32, the CPU default, where every loaded model is a copy;
2. a cached switch (budget fits two models);
3. the LoRA: first activation, re-activation after a job without it (a patch-cache hit), bytes held once off;
4. the first GET /sdapi/v1/sd-models (hashes null, filled in by the background hasher) and a first load
   (which no longer hashes);
5. stats()["ram_used"] against the RSS growth of loading one model.

The temp folder is removed at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402

MB = 1024**2
LORA_CACHE_MB = 6144  # room for the patched set of a rank-32 all-layer LoRA at full size


# ---- the files (child process) -----------------------------------------------------------------------------
def _components(scale: int, seed: int):
    """SD1.5's architecture with widths divided by ``scale``, random weights, fp16."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.loading.tokenizers import load_clip_tokenizer
    from studio.loading.components import Components
    from studio.loading.ldm_config import scheduler_config

    torch.manual_seed(seed)
    text = 768 // scale
    te = CLIPTextModel(CLIPTextConfig(hidden_size=text, intermediate_size=3072 // scale, num_hidden_layers=12,
                                      num_attention_heads=12 // scale, vocab_size=49408, max_position_embeddings=77,
                                      hidden_act="quick_gelu", projection_dim=text, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=tuple(c // scale for c in (320, 640, 1280, 1280)),
                                cross_attention_dim=text, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                        block_out_channels=[c // scale for c in (128, 256, 512, 512)], sample_size=512,
                        scaling_factor=0.18215)
    return Components(family="sd1", unet=unet.half(), vae=vae.half(), text_encoder=te.half(),
                      tokenizer=load_clip_tokenizer(), scheduler_config=scheduler_config(),
                      source=f"bench-sd15-{seed}")


def _kohya_lora(c, rank: int, seed: int) -> dict:
    """A kohya LoRA on every layer LoRAs touch (tests/lorafiles.kohya_lora also returns the fp32 ΔW of each
    layer, ~3.4 GB at this size, which a benchmark does not need)."""
    import torch

    from tests.lorafiles import all_targets, kohya_name

    g, sd = torch.Generator().manual_seed(seed), {}
    for attr, path, m in all_targets(c, conv=True, te=True):
        out_, in_ = m.weight.shape[:2]
        kernel = tuple(m.weight.shape[2:])
        stem = kohya_name(c, attr, path)
        sd[stem + ".lora_down.weight"] = (torch.randn(rank, in_, *kernel, generator=g) * 0.01).half()
        sd[stem + ".lora_up.weight"] = (torch.randn(out_, rank, *([1] * len(kernel)), generator=g) * 0.01).half()
        sd[stem + ".alpha"] = torch.tensor(float(rank // 2))
    return sd


def write_files(root: Path, scale: int) -> None:
    import torch

    from studio.loading.ldm_export import save_ldm_single_file
    from tests import lorafiles

    c = _components(scale, seed=0)
    ckpts = root / "Stable-diffusion"
    save_ldm_single_file(c, ckpts / "A.safetensors")
    with torch.no_grad():  # B: another model (other bytes, other hash), same architecture
        for p in c.unet.parameters():
            p.mul_(0.5)
    save_ldm_single_file(c, ckpts / "B.safetensors")
    lorafiles.write(root / "Lora" / "big.safetensors", _kohya_lora(c, rank=32, seed=1), lorafiles.metadata_for(c))


# ---- measuring ---------------------------------------------------------------------------------------------
def rss() -> int:
    return psutil.Process().memory_info().rss


def anon() -> int:
    """RSS not backed by a file: safetensors maps the checkpoint, and an fp16 file read as fp16 stays a view of
    the mapping (those pages are the OS page cache's, counted in RSS only while resident)."""
    info = psutil.Process().memory_info()
    return info.rss - info.shared


class PeakRSS:
    """Highest RSS (and anonymous RSS) seen while the ``with`` block runs (a thread samples every 10 ms)."""

    def __enter__(self):
        self.peak, self.peak_anon, self._stop = rss(), anon(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        proc = psutil.Process()
        while not self._stop.wait(0.01):
            info = proc.memory_info()
            self.peak, self.peak_anon = max(self.peak, info.rss), max(self.peak_anon, info.rss - info.shared)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak, self.peak_anon = max(self.peak, rss()), max(self.peak_anon, anon())


def touch(manager) -> None:
    """Read every weight of the current model, as its first job does: safetensors maps the file, and an fp16
    file read as fp16 stays a view of the mapping, resident (counted in RSS) only once read."""
    import torch

    with torch.no_grad():
        for module in manager.current_components().modules().values():
            for t in module.parameters():
                t.sum()


def _patcher_bytes(patcher) -> int:
    """Bytes the LoRA patcher keeps: originals of patched tensors and cached patched sets (its internals, read
    defensively: a later patcher may keep them otherwise and report them in stats()["extras"])."""
    originals = getattr(patcher, "_originals", {})
    sets = getattr(patcher, "_sets", {})
    return sum(entry[-1].numel() * entry[-1].element_size() for entry in originals.values()) + \
        sum(getattr(s, "nbytes", 0) for s in sets.values())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def studio_for(root: Path, data: Path, **settings):
    from studio.app import Studio
    from studio.settings import Settings

    known = {k: v for k, v in settings.items() if k in Settings.__dataclass_fields__}
    return Studio(Settings(models_dir=str(root), data_dir=str(data), outdir=str(data / "out"), precision="fp16",
                           device="cpu", **known))


def bench_listing(root: Path, tmp: Path) -> dict:
    """4a. First /sdapi/v1/sd-models on a fresh hash cache; time until the background hashes are listed."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from studio.api import build_router

    studio = studio_for(root, tmp / "data-list")
    app = FastAPI()
    app.include_router(build_router(studio))
    with TestClient(app) as client:
        t0 = time.perf_counter()
        first = client.get("/sdapi/v1/sd-models").json()
        first_s = time.perf_counter() - t0
        while any(m["sha256"] is None for m in client.get("/sdapi/v1/sd-models").json()):
            time.sleep(0.05)
        hashed_s = time.perf_counter() - t0
    return {"list_s": first_s, "list_null": all(m["sha256"] is None for m in first), "hashed_s": hashed_s,
            "listed": len(first)}


def bench_fp32_switch(root: Path, data: Path, file_mb: float) -> dict:
    """Item 1 at the CPU's default precision: fp32 loads are casts, so every loaded model is anonymous memory
    (no file mapping shares it) and holding two at once shows in RSS."""
    budget = int(file_mb * 2 * 1.3)
    studio = studio_for(root, data, ram_budget_mb=budget, vram_budget_mb=budget)
    manager = studio.manager
    studio.settings.precision = "fp32"
    manager.__dict__.pop("dtype", None)
    base = rss()
    manager.load("A.safetensors")
    touch(manager)
    one = rss() - base
    with PeakRSS() as new:
        manager.load("B.safetensors")
        touch(manager)
    manager._estimate = lambda info: None  # the room made only after loading, as before the header sizes
    with PeakRSS() as old:
        manager.load("A.safetensors")
        touch(manager)
    manager.unload_all()
    return {"one": one, "new": new.peak - base, "old": old.peak - base, "budget": budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half widths (~0.55 GB files, a minute or two)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tmp", default="/tmp", help="where the temp folder goes (needs ~5 GB free)")
    parser.add_argument("--write", help=argparse.SUPPRESS)  # the child process that writes the files
    args = parser.parse_args()
    scale = 2 if args.quick else 1
    if args.write:
        write_files(Path(args.write), scale)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.tmp))
    try:
        run(tmp, scale, args.runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, scale: int, runs: int) -> None:
    from studio.adapters import patcher_for

    root = tmp / "models"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_memory", "--write", str(root)]
                   + (["--quick"] if scale == 2 else []), check=True)
    print(f"files written in {time.perf_counter() - t0:.0f} s", flush=True)
    file_mb = (root / "Stable-diffusion" / "A.safetensors").stat().st_size / MB
    lora_mb = (root / "Lora" / "big.safetensors").stat().st_size / MB

    listing = bench_listing(root, tmp)
    print("listing done", flush=True)

    # one model's worth of budget: a switch must evict A before B is read
    one = int(file_mb * 1.3)
    studio = studio_for(root, tmp / "data", ram_budget_mb=one, vram_budget_mb=one, lora_patch_cache_mb=LORA_CACHE_MB)
    manager = studio.manager
    _ = manager.device, manager.dtype
    base, base_anon = rss(), anon()
    load_s, info_a = timed(lambda: manager.load("A.safetensors"))
    hashed_at_load = info_a.sha256 is not None
    mapped_rss = rss() - base
    touch(manager)
    loaded_rss, loaded_anon = rss() - base, anon() - base_anon
    ram_used = manager.stats()["ram_used"]
    manager.registry.ensure_hash(info_a)  # let the background hash finish before timing anything else
    print("first load done", flush=True)

    with PeakRSS() as peak:  # the switch and B's first job reading its weights
        switch_s, _ = timed(lambda: manager.load("B.safetensors"))
        touch(manager)
    switch_peak, switch_anon = peak.peak - base, peak.peak_anon - base_anon
    after_switch = rss() - base
    # the same switch (B -> A) with the room made only after loading, as before the header sizes
    manager._estimate = lambda info: None
    with PeakRSS() as old_peak:
        manager.load("A.safetensors")
        touch(manager)
    del manager._estimate
    old_switch_peak = old_peak.peak - base
    print("switch past the budget done", flush=True)

    # 2. a budget for two models: switches are cache hits
    studio.settings.ram_budget_mb = studio.settings.vram_budget_mb = int(file_mb * 2.3)
    manager.load("B.safetensors"), manager.load("A.safetensors")
    loads = manager.loads
    cached = []
    for _ in range(runs):
        for name in ("B.safetensors", "A.safetensors"):
            cached.append(timed(lambda name=name: manager.load(name))[0])
    assert manager.loads == loads, "a cached switch read the file again"
    print("cached switches done", flush=True)

    # 3. the LoRA on model A
    with manager.acquire("A.safetensors", vae="None") as loaded:
        patcher = patcher_for(loaded.components)
        if "lora_patch_cache_mb" not in type(studio.settings).__dataclass_fields__:
            patcher.cache_bytes = LORA_CACHE_MB * MB  # this branch has no setting yet: what it would set
        before_lora = rss()
        read_s, (active, _) = timed(lambda: studio.loras.resolve([("big", 1.0, 1.0)]))
        patch_s, _ = timed(lambda: patcher.apply(active))
        first_s = read_s + patch_s
        computed = patcher.patch_count
        again = []
        for _ in range(runs):
            patcher.apply([])
            again.append(timed(lambda: patcher.apply(studio.loras.resolve([("big", 1.0, 1.0)])[0]))[0])
        hits = patcher.patch_count == computed
        patcher.apply([])
        extras = manager.stats().get("extras")
        held = _patcher_bytes(patcher)
        lora_rss = rss() - before_lora
    print("LoRA done", flush=True)
    manager.unload_all()
    fp32 = bench_fp32_switch(root, tmp / "data-fp32", file_mb)

    rows = [
        ("model file (fp16)", f"{file_mb:.0f} MB", f"LoRA file {lora_mb:.0f} MB (rank 32, every layer)"),
        ("1. switch past budget: peak RSS", f"{switch_peak / MB:.0f} MB",
         f"{switch_peak / max(loaded_rss, 1):.2f} x one loaded model's RSS ({loaded_rss / MB:.0f} MB), "
         f"{switch_peak / MB / file_mb:.2f} x file, {switch_peak / MB / one:.2f} x budget ({one} MB); anonymous "
         f"{switch_anon / MB:.0f} MB; {switch_s:.1f} s; RSS after {after_switch / MB:.0f} MB"),
        ("   same, sized after loading (old)", f"{old_switch_peak / MB:.0f} MB",
         f"{old_switch_peak / max(loaded_rss, 1):.2f} x one loaded model's RSS"),
        ("   fp32 (the CPU default): peak RSS", f"{fp32['new'] / MB:.0f} MB",
         f"{fp32['new'] / fp32['one']:.2f} x one loaded model's RSS ({fp32['one'] / MB:.0f} MB), budget "
         f"{fp32['budget']} MB; sized after loading (old): {fp32['old'] / MB:.0f} MB = "
         f"{fp32['old'] / fp32['one']:.2f} x"),
        ("2. cached switch (budget 2 models)", f"{statistics.median(cached) * 1000:.2f} ms",
         f"median of {len(cached)}, no file read"),
        ("3. LoRA first activation", f"{first_s * 1000:.0f} ms", f"read + parse {read_s * 1000:.0f} ms, patch {patch_s * 1000:.0f} ms"),
        ("   LoRA re-activation", f"{statistics.median(again) * 1000:.0f} ms",
         f"median of {runs}; patch-cache hit: {hits}"),
        ("   held after LoRA off", f"{held / MB:.0f} MB",
         f"originals + cached sets; RSS +{lora_rss / MB:.0f} MB; stats extras: {extras}"),
        ("4. first GET sd-models", f"{listing['list_s'] * 1000:.0f} ms",
         f"{listing['listed']} models, hashes null: {listing['list_null']}; "
         f"hashes listed after {listing['hashed_s']:.1f} s"),
        ("   first load of a model", f"{load_s:.1f} s", f"hashed during load: {hashed_at_load}"),
        ("5. stats ram_used", f"{ram_used / MB:.0f} MB",
         f"RSS growth {loaded_rss / MB:.0f} MB once read (ratio {ram_used / max(loaded_rss, 1):.2f}; "
         f"{mapped_rss / MB:.0f} MB right after loading: mapped), anonymous {loaded_anon / MB:.0f} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nMemory at real size ({'quick: half widths' if scale == 2 else 'SD1.5 size'}, CPU, fp16)")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>9}  {note}")


if __name__ == "__main__":
    main()
