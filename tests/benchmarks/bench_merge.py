"""Checkpoint-merge benchmark (issue [8/9]): run on demand, prints a table measured in ONE run.

    python -m tests.benchmarks.bench_merge [--channels 192] [--keep]

Writes two synthetic checkpoints in the real SD1 LDM layout (every UNet / VAE / CLIP key of SD 1.5, random
fp16 values; UNet width ``--channels`` (default 192) instead of 320 so each file is ~1 GB — at 320 they are 2.1 GB), then
merges them (weighted sum) in a child process and reports:

1. peak RSS of the merge / size of one input (target <= 0.5: streaming). The child's RSS includes the Python +
   torch runtime (~0.5 GB: torch alone is ~280 MB anonymous + ~230 MB mapped libraries); that baseline (RSS
   just before the merge starts) and what the merge adds on top of it are reported next to it.
2. merge wall time / time to read both inputs once (target <= 2), cold (inputs dropped from the page cache with
   posix_fadvise DONTNEED first) and warm (inputs cached). Metadata hashing (sha256 of both inputs) is off in
   these runs and measured in an extra warm run, since A1111's hashes are cached after the first time.
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


def read_once(*paths: Path) -> float:
    buf = bytearray(16 << 20)
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def child(root: str, out_name: str, metadata: bool) -> None:
    """Runs in its own process: one merge; prints JSON with times and RSS figures."""
    import psutil

    from studio.merge import MergeSpec, merge_checkpoints
    from studio.registry import Registry
    from studio.settings import Settings
    settings = Settings(models_dir=os.path.join(root, "models"), data_dir=os.path.join(root, "data"))
    registry = Registry(settings)
    proc = psutil.Process()

    def anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))

    base, base_anon = proc.memory_info().rss, anon()
    peak = [base, base_anon]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0], peak[1] = max(peak[0], proc.memory_info().rss), max(peak[1], anon())
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    merge_checkpoints(MergeSpec(a="a", b="b", multiplier=0.3, output_name=out_name, save_metadata=metadata,
                                overwrite=True), registry, settings)
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    # VmHWM: this process image's peak RSS (ru_maxrss would also count the parent, inherited across exec)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    hwm = int(status["VmHWM"].split()[0]) * 1024
    print(json.dumps({"wall": wall, "baseline_rss": base, "peak_rss_sampled": peak[0], "vm_hwm": hwm,
                      "peak_anon_sampled": peak[1], "baseline_anon": base_anon}))


def run_child(root: Path, out_name: str, metadata: bool) -> dict:
    res = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_merge", "--child", str(root), out_name,
                          "1" if metadata else "0"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=192)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "OUT", "META"))
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2] == "1")
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
            if label == "cold":
                drop_cache(a, b, out)
            read = read_once(a, b)
            if label == "cold":
                drop_cache(a, b, out)
            else:
                read_once(a, b)  # make sure both are cached before the warm merge
            r = run_child(root, "out", metadata=False)
            rows.append((label, read, r))
        r_meta = run_child(root, "out", metadata=True)
        print()
        print(f"{'run':<6} {'read both (s)':>13} {'merge (s)':>10} {'time ratio':>10} {'peak RSS (MB)':>13} "
              f"{'baseline (MB)':>13} {'RSS/input':>9} {'(peak-base)/input':>17} {'anon peak-base (MB)':>19}")
        for label, read, r in rows:
            peak = max(r["peak_rss_sampled"], r["vm_hwm"])
            print(f"{label:<6} {read:>13.2f} {r['wall']:>10.2f} {r['wall'] / read:>10.2f} {peak / 1e6:>13.0f} "
                  f"{r['baseline_rss'] / 1e6:>13.0f} {peak / size:>9.3f} {(peak - r['baseline_rss']) / size:>17.3f} "
                  f"{(r['peak_anon_sampled'] - r['baseline_anon']) / 1e6:>19.0f}")
        warm_read = rows[1][1]
        print(f"\nwarm merge with metadata (sha256 of both inputs): {r_meta['wall']:.2f}s "
              f"(ratio {r_meta['wall'] / warm_read:.2f}); targets: RSS/input <= 0.5, time ratio <= 2")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
