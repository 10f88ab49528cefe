"""Aspect-ratio buckets (kohya's rule) or a fixed centre crop, the per-epoch batch order, and the latent cache.

The batch order of an epoch is a pure function of (seed, epoch): resuming needs only the epoch and the index of
the next batch, and gives the same data order as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import StudioError
from .dataset import ImageItem


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int = 64) -> list[tuple[int, int]]:
    """(width, height) buckets with area <= resolution², sides in [min_reso, max_reso], multiples of ``step``."""
    max_area = resolution * resolution
    out = {(resolution // step * step,) * 2}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            out.add((width, height))
            out.add((height, width))
        width += step
    return sorted(out)


def pick_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (ties: the larger area)."""
    ar = w / h
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ar), -b[0] * b[1]))


@dataclass
class BucketPlan:
    """Which image goes to which (width, height); ``report()`` is what the tab shows."""

    sizes: list[tuple[int, int]]                     # per item
    buckets: list[tuple[int, int]] = field(default_factory=list)

    def report(self, items: list[ImageItem]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for item, (w, h) in zip(items, self.sizes):
            out.setdefault(f"{w}x{h}", []).append(item.path.name)
        return dict(sorted(out.items()))


def plan_buckets(items: list[ImageItem], *, resolution: int, enable: bool = True, min_reso: int = 256,
                 max_reso: int = 1024, step: int = 64) -> BucketPlan:
    if not enable:
        return BucketPlan([(resolution, resolution)] * len(items), [(resolution, resolution)])
    # small test resolutions: never let min / max exclude the square bucket itself
    buckets = make_buckets(resolution, min(min_reso, resolution), max(max_reso, resolution), step)
    return BucketPlan([pick_bucket(i.width, i.height, buckets) for i in items], buckets)


def load_pixels(path: Path, size: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """Resize to cover ``size`` (w, h), centre-crop, optionally flip; float tensor [3, h, w] in [-1, 1]."""
    from PIL import Image, ImageOps

    w, h = size
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        scale = max(w / im.width, h / im.height)
        rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((rw, rh), Image.Resampling.LANCZOS)
        left, top = (rw - w) // 2, (rh - h) // 2
        im = im.crop((left, top, left + w, top + h))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    return t.permute(2, 0, 1).float().div(127.5).sub(1.0)


def epoch_batches(sizes: list[tuple[int, int]], repeats: list[int], batch_size: int, seed: int, epoch: int
                  ) -> list[list[int]]:
    """Batches of item indices for one epoch: repeats expanded, grouped by bucket, shuffled with (seed, epoch)."""
    rng = random.Random(f"{seed}:{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for idx, (size, n) in enumerate(zip(sizes, repeats)):
        by_bucket.setdefault(size, []).extend([idx] * n)
    batches = []
    for size in sorted(by_bucket):
        pool = by_bucket[size]
        rng.shuffle(pool)
        batches += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    rng.shuffle(batches)
    return batches


class LatentCache:
    """VAE latents per (image, size, flip), encoded once; kept in RAM or as files in ``folder`` ("disk").

    ``encodes`` counts VAE encoder calls per image (the benchmark checks each image is encoded once)."""

    def __init__(self, vae, *, mode: str = "ram", folder: str | os.PathLike | None = None, dtype=torch.float32):
        self.vae, self.mode, self.dtype = vae, mode, dtype
        self.folder = Path(folder) if folder else None
        self.ram: dict[str, torch.Tensor] = {}
        self._keys: dict[tuple, str] = {}   # (path, size, flip) -> key: no stat + hash per training step
        self.encodes = 0
        self.scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @staticmethod
    def key(path: Path, size: tuple[int, int], flip: bool) -> str:
        st = os.stat(path)
        raw = f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}|{size[0]}x{size[1]}|{int(flip)}"
        return hashlib.sha1(raw.encode()).hexdigest()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, source: str | os.PathLike = "") -> torch.Tensor:
        """[B, 3, h, w] in [-1, 1] -> scaled latents (the distribution mean: deterministic, cacheable), on the
        CPU (a cache of thousands stays out of device memory; the trainer moves each batch)."""
        self.encodes += pixels.shape[0]
        dev = next(self.vae.parameters()).device
        dist = self.vae.encode(pixels.to(dev, self.vae.dtype)).latent_dist
        latent = ((dist.mean - self.shift) * self.scaling).to(torch.float32).cpu()
        if not torch.isfinite(latent).all():
            raise StudioError(f"The VAE gave NaN / infinite latents for {Path(source).name or 'an image'} "
                              f"(VAE in {str(self.vae.dtype).removeprefix('torch.')}).", path=str(source),
                              fix="keep the training VAE in fp32 (an fp16 SDXL VAE overflows), or use a VAE "
                                  "fixed for fp16 (e.g. sdxl-vae-fp16-fix) in the checkpoint")
        return latent

    def get(self, path: Path, size: tuple[int, int], flip: bool) -> torch.Tensor:
        if self.mode == "none":
            return self.encode(load_pixels(path, size, flip)[None], path)[0]
        k = self._keys.get((path, size, flip))
        if k is None:
            k = self._keys[(path, size, flip)] = self.key(path, size, flip)
        if k in self.ram:
            return self.ram[k]
        file = self.folder / f"{k}.safetensors" if self.mode == "disk" and self.folder else None
        latent = None
        if file is not None and file.is_file():
            from safetensors.torch import load_file
            latent = load_file(str(file))["latent"]
            if not torch.isfinite(latent).all():
                latent = None       # cached by an fp16 VAE (before the caching VAE was fp32): encode again
        if latent is None:
            latent = self.encode(load_pixels(path, size, flip)[None], path)[0]
            if file is not None:
                from safetensors.torch import save_file
                from .atomic import write_with
                write_with(file, lambda p: save_file({"latent": latent.contiguous()}, p))
        if self.mode == "ram":
            self.ram[k] = latent
        return latent

    def warm(self, items: list[ImageItem], sizes: list[tuple[int, int]], flip: bool, stop=None) -> None:
        """Encode everything up front so training steps never wait on the VAE; ``stop()`` true ends it early
        (a large dataset takes minutes)."""
        if self.mode == "none":
            return
        for item, size in zip(items, sizes):
            if stop is not None and stop():
                return
            for f in ((False, True) if flip else (False,)):
                latent = self.get(item.path, size, f)
                if self.mode == "disk":
                    self.ram.pop(self.key(item.path, size, f), None)
                del latent
