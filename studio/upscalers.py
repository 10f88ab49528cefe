"""Hires-fix upscalers: latent interpolation modes and image upscalers, in one extensible registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image

from .errors import StudioError


@dataclass(frozen=True)
class Upscaler:
    """``latent_mode`` set: works on latents with torch interpolate; else ``fn(image, w, h) -> image``."""

    name: str
    latent_mode: str | None = None
    antialias: bool = False
    fn: Callable[[Image.Image, int, int], Image.Image] | None = None

    @property
    def is_latent(self) -> bool:
        return self.latent_mode is not None


def _pil(method: int) -> Callable[[Image.Image, int, int], Image.Image]:
    return lambda image, w, h: image.resize((w, h), method)


class Upscalers:
    """Name -> Upscaler. Built-ins are A1111's latent modes plus Lanczos / Nearest; extensions add more."""

    def __init__(self) -> None:
        self._items: dict[str, Upscaler] = {}
        for name, mode, aa in (("Latent", "bilinear", False), ("Latent (antialiased)", "bilinear", True),
                               ("Latent (bicubic)", "bicubic", False),
                               ("Latent (bicubic antialiased)", "bicubic", True),
                               ("Latent (nearest)", "nearest", False),
                               ("Latent (nearest-exact)", "nearest-exact", False)):
            self.register(Upscaler(name, latent_mode=mode, antialias=aa))
        self.register(Upscaler("None", fn=_pil(Image.LANCZOS)))  # A1111: plain resize of the first pass image
        self.register(Upscaler("Lanczos", fn=_pil(Image.LANCZOS)))
        self.register(Upscaler("Nearest", fn=_pil(Image.NEAREST)))

    def register(self, upscaler: Upscaler) -> None:
        if not upscaler.is_latent and upscaler.fn is None:
            raise ValueError(f"upscaler {upscaler.name!r} needs a latent mode or a function")
        self._items[upscaler.name] = upscaler

    def names(self) -> list[str]:
        return list(self._items)

    def get(self, name: str) -> Upscaler:
        if name in self._items:
            return self._items[name]
        for key, item in self._items.items():
            if key.lower() == name.lower():
                return item
        raise StudioError(f"Unknown hires upscaler {name!r}.", field="hr_upscaler",
                          fix=f"use one of: {', '.join(self._items)}")

    def latent(self, upscaler: Upscaler, latents, width: int, height: int):
        import torch.nn.functional as F

        size = (height // 8, width // 8)
        mode = upscaler.latent_mode
        kwargs = {"antialias": True} if upscaler.antialias else {}
        if mode in ("bilinear", "bicubic"):
            kwargs["align_corners"] = False
        return F.interpolate(latents, size=size, mode=mode, **kwargs)
