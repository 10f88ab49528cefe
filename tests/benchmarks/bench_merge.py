"""Checkpoint-merge benchmark (issue [8/9]): run on demand, prints a table measured in ONE run.

    python -m tests.benchmarks.bench_merge [--channels 192] [--keep]

Writes two synthetic checkpoints in the real SD1 LDM layout (every UNet / VAE / CLIP key of SD 1.5, random
fp16 values; UNet width ``--channels`` (default 192) instead of 320 so each file is ~1 GB — at 320 they are 2.1 GB), then
merges them (weighted sum) in a child process and reports:

1. peak RSS of the merge / size of one input (target <= 0.5: streaming). The merge runs in the studio's merge
   worker process (torch-free); its peak RSS plus whatever the calling process (the studio: torch imported, like
   the server) grew by during the merge is the merge's memory.
2. merge wall time / time to read both inputs once (target <= 2), cold (inputs dropped from the page cache with
   posix_fadvise DONTNEED first: "reading a file" means from the disk; the faster of a plain read and an
   O_DIRECT read is the yardstick) and, for information, warm (inputs
   cached). The wall time is the whole ``merge_checkpoints`` call (planning, starting the worker, the merge);
   "kernel" is the worker's own time. Warm, the floor is writing the output: a no-interpolation run (read A,
   write the output) is printed next to it. Hashing is off in these runs and measured in an extra warm run as
   the Merge tab does it: sha256 of both inputs for the metadata (cached after the first time, as in A1111) and
   of the output, computed while it is written, for its title.
The big files live in a temp dir and are deleted at the end (unless --keep).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sd1_layout(channels: int) -> dict:
    """LDM key -> (shape, dtype) of an SD1 checkpoint, from meta-device diffusers/transformers models."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.loading.ldm_export import clip_to_ldm, unet_to_ldm, vae_to_ldm
    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(channels, 2 * channels, 4 * channels, 4 * channels),
                                    cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))
    sd = unet_to_ldm(unet.state_dict(), unet.config)
    sd.update(vae_to_ldm(vae.state_dict()))
    sd.update(clip_to_ldm(te, "cond_stage_model.transformer.text_model."))
    return {k: tuple(v.shape) for k, v in sd.items()}


def write_random(path: Path, layout: dict, seed: int) -> int:
    """Stream random fp16 tensors into ``path`` (one tensor in memory at a time)."""
    import torch

    from studio.merge.stio import TensorInfo, write_streaming
    plan = {k: TensorInfo(torch.float16, s) for k, s in layout.items()}
    g = torch.Generator().manual_seed(seed)
    write_streaming(path, plan, lambda k: torch.randn(plan[k].shape, generator=g, dtype=torch.float32).half())
    return path.stat().st_size


def drop_cache(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_once_direct(*paths: Path) -> float:
    """Read both with O_DIRECT (around the page cache), as the merge kernel reads uncached inputs."""
    import mmap
    buf = memoryview(mmap.mmap(-1, 16 << 20))
    t = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            off = 0
            while got := os.preadv(fd, [buf], off):
                off += got
        finally:
            os.close(fd)
    return time.perf_counter() - t


def read_once(*paths: Path) -> float:
    buf = bytearray(16 << 20)
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def child(root: str, out_name: str, metadata: bool, method: str) -> None:
    """``metadata``: as the Merge tab runs it (sha256 of the inputs for the recipe, of the output for its title)."""
    """Runs in its own process, as the studio would: one merge; prints JSON with times and RSS figures."""
    import psutil

    from studio.merge import MergeReport, MergeSpec, merge_checkpoints
    from studio.registry import Registry
    from studio.settings import Settings
    settings = Settings(models_dir=os.path.join(root, "models"), data_dir=os.path.join(root, "data"))
    registry = Registry(settings)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    report = MergeReport()
    t = time.perf_counter()
    merge_checkpoints(MergeSpec(a="a", b="b" if method != "no_interpolation" else None, method=method,
                                multiplier=0.3, output_name=out_name, save_metadata=metadata, overwrite=True),
                      registry, settings, report=report, hash_output=metadata)
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    print(json.dumps({"wall": wall, "caller_base": base, "caller_peak": peak[0], **report.stats}))


def run_child(root: Path, out_name: str, metadata: bool, method: str = "weighted_sum") -> dict:
    res = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_merge", "--child", str(root), out_name,
                          "1" if metadata else "0", method], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=192)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("ROOT", "OUT", "META", "METHOD"))
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2] == "1", args.child[3])
    root = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    ckpt = root / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    a, b, out = ckpt / "a.safetensors", ckpt / "b.safetensors", ckpt / "out.safetensors"
    try:
        layout = sd1_layout(args.channels)
        t = time.perf_counter()
        size = write_random(a, layout, 1)
        write_random(b, layout, 2)
        print(f"wrote 2 x {size / 1e9:.2f} GB ({len(layout)} tensors, SD1 layout, UNet width {args.channels}) "
              f"in {time.perf_counter() - t:.1f}s", flush=True)
        rows = []
        for label in ("cold", "warm"):
            if label == "cold":  # the faster of reading through the page cache and around it: the strict yardstick
                drop_cache(a, b, out)
                read = read_once(a, b)
                drop_cache(a, b, out)
                if hasattr(os, "O_DIRECT"):
                    direct = read_once_direct(a, b)
                    print(f"cold read of both: {read:.2f}s through the page cache, {direct:.2f}s with O_DIRECT")
                    read = min(read, direct)
                    drop_cache(a, b, out)
            else:
                read_once(a, b)  # the cold merge read around the page cache: fill it first
                read = read_once(a, b)
            rows.append((label, read, run_child(root, "out", metadata=False)))
        r_meta = run_child(root, "out", metadata=True)
        read_once(a)
        r_copy = run_child(root, "out", metadata=False, method="no_interpolation")
        first = rows[0][2]
        print(f"\nweighted sum, M = 0.3; merge worker: torch loaded {first['torch_loaded']}, in process "
              f"{first['in_process']}, O_DIRECT output {first['direct_io']}, {first['workers']} threads")
        print(f"{'run':<6} {'read both (s)':>13} {'merge (s)':>10} {'kernel (s)':>10} {'time ratio':>10} "
              f"{'worker peak RSS (MB)':>20} "
              f"{'caller growth (MB)':>18} {'RSS/input':>9} {'caller baseline (MB)':>20}")
        for label, read, r in rows:
            grow = max(0, r["caller_peak"] - r["caller_base"])
            print(f"{label:<6} {read:>13.2f} {r['wall']:>10.2f} {r['seconds']:>10.2f} {r['wall'] / read:>10.2f} "
                  f"{r['peak_rss'] / 1e6:>20.0f} "
                  f"{grow / 1e6:>18.0f} {(r['peak_rss'] + grow) / size:>9.3f} {r['caller_base'] / 1e6:>20.0f}")
        warm_read = rows[1][1]
        print("\nRSS/input = (worker peak RSS + growth of the calling process) / size of one input. The caller is a "
              "Python process with the studio and torch imported, as the server is; its baseline is not the merge's.")
        print(f"warm merge with hashes (sha256 of both inputs, uncached, and of the output): {r_meta['wall']:.2f}s "
              f"(ratio {r_meta['wall'] / warm_read:.2f})")
        print(f"floor, warm: no-interpolation copy of A (read one input, write the output): {r_copy['wall']:.2f}s "
              f"(ratio {r_copy['wall'] / warm_read:.2f})")
        print("targets: RSS/input <= 0.5, time ratio (cold) <= 2")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
