"""Cheap live previews: latents -> RGB with one linear projection per family (no VAE decode).

The coefficients (each family's ``latent_rgb``) are the community's least-squares fits of VAE decodes against
the latent channels, as used by A1111's "Approx cheap" preview (first published by Keturn for SD1). They are
approximate: colours and contrast are roughly right, detail is 8× coarser. They apply to the latents the UNet sees (already
multiplied by the VAE scaling factor), which is what a diffusers step callback hands out.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from PIL import Image

from . import families

log = logging.getLogger(__name__)

def latent_rgb_coefficients(family: str | None, channels: int = 4) -> tuple[tuple[float, float, float], ...] | None:
    """The family's latent -> RGB projection (rows: latent channels) when it has one for ``channels`` latent
    channels; an unknown family gets the first family's projection of that size (SD 1.x's for 4)."""
    fam = families.get((family or "").lower())
    if fam is not None and len(fam.latent_rgb) == channels:
        return fam.latent_rgb
    if fam is None:
        return next((f.latent_rgb for f in families.all_families() if len(f.latent_rgb) == channels), None)
    return None


def latents_to_preview(latents: Any, family: str | None = None, *, scale: int = 8) -> Image.Image:
    """First image of ``latents`` ([B,C,h,w] or [C,h,w], tensor or array) as an RGB image ``scale``× larger.

    Latents use the family's projection where it has one for their channel count; otherwise the first three
    channels are shown, each min-max normalised (a grey image for one channel).
    """
    import numpy as np
    import torch

    x = torch.as_tensor(latents).detach()
    if x.ndim == 4:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"Expected latents shaped [B,C,h,w] or [C,h,w], got {tuple(x.shape)}.")
    # One small image: numpy on the CPU from here. Torch's intra-op thread pool is slower than the work
    # itself at this size and stalls badly when the CPU is busy (e.g. the sampler running next to it).
    x = x.to("cpu", torch.float32).numpy()
    channels, h, w = x.shape
    coefs = latent_rgb_coefficients(family, channels)
    if coefs is not None:
        coefs = np.asarray(coefs, dtype=np.float32)
        rgb = np.tensordot(x, coefs, axes=(0, 0))          # h × w × 3, roughly in [-1, 1]
        fam = families.get((family or "").lower())
        if fam is not None and any(fam.latent_rgb_bias):
            rgb += np.asarray(fam.latent_rgb_bias, dtype=np.float32)
        rgb += 1.0
        rgb *= 127.5
    else:
        x = x[:3] if channels >= 3 else np.repeat(x[:1], 3, axis=0)
        lo = x.min(axis=(1, 2), keepdims=True)
        span = np.maximum(x.max(axis=(1, 2), keepdims=True) - lo, 1e-6)
        rgb = ((x - lo) / span * 255.0).transpose(1, 2, 0)
    pixels = np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    image = Image.fromarray(pixels)  # uint8 h×w×3 -> RGB
    return image.resize((w * scale, h * scale), Image.NEAREST) if scale != 1 else image


class LivePreview:
    """Previews made off the sampling thread: ``send`` only starts a copy of the latents to the CPU, a helper
    thread turns them into an image and hands it to ``publish``.

    On CUDA the copy is non-blocking into pinned memory (torch pins the destination of a non-blocking
    device->host copy) with an event the helper waits on, so the sampler never waits for the GPU to drain. Only
    the newest latents count: one sent while the helper is busy replaces an older one still waiting. The helper
    thread ends when nothing is left to do (no thread outlives a quiet sampler, nothing to shut down).
    """

    def __init__(self, publish: Callable[[Image.Image], Any], family: str | None = None):
        self._publish, self._family = publish, family
        self._lock = threading.Lock()
        self._pending: tuple[Any, Any] | None = None
        self._thread: threading.Thread | None = None
        self.published = 0

    def send(self, latents: Any) -> None:
        import torch

        x = latents.detach()[:1]
        if x.device.type == "cuda":
            host = x.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:  # a copy: the sampler may update its latents in place while the helper reads them
            host, done = x.to("cpu", copy=True), None
        with self._lock:
            self._pending = (host, done)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="studio-preview", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                item, self._pending = self._pending, None
                if item is None:
                    self._thread = None
                    return
            host, done = item
            try:
                if done is not None:
                    done.synchronize()
                image = latents_to_preview(host, self._family)
            except Exception:  # noqa: BLE001 - a failed preview must never stop the job
                log.exception("Live preview failed")
                continue
            self._publish(image)
            self.published += 1

    def wait(self, timeout: float | None = None) -> None:
        """Until the previews sent so far are published (tests; a job never needs to wait)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
