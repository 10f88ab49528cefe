"""Running ControlNet units in diffusers: the multi-ControlNet module, the call arguments, the pipeline view.

``ControlNetSet`` is a diffusers ``MultiControlNetModel`` (so every ControlNet pipeline accepts it) whose forward
adds what the A1111 extension does per unit and diffusers does not:

* control modes, per unit: "Balanced" = plain; "My prompt is more important" = soft injection (the residual
  of block i of n is scaled by 0.825 ** (n - 1 - i), the extension's factors; the mid block keeps 1.0);
  "ControlNet is more important" = soft injection + the control only on the conditional half of the CFG batch
  (the extension's cfg_injection; diffusers' ``guess_mode`` does the same but for all units at once).
* a unit outside its guidance range, or with weight 0, is not run at all (diffusers would run it at scale 0).
* an optional per-unit mask restricts where the unit acts: it multiplies the unit's residuals, resized to each
  residual's size (the extension's "effective region mask"), rather than blanking the control image (a black
  control image is itself a signal).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

from ..errors import StudioError
from .units import CONTROL_MODES, ControlUnit

SOFT_BASE = 0.825  # the extension's soft-injection factor per block


def soft_scales(n: int) -> list[float]:
    return [SOFT_BASE ** float(n - 1 - i) for i in range(n)]


def mask_tensor(mask: Image.Image | None, width: int, height: int) -> torch.Tensor | None:
    """(1, 1, H, W) float in [0, 1] from a mask image (white = the unit acts)."""
    if mask is None:
        return None
    m = mask.convert("L")
    if m.size != (width, height):
        m = m.resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]


class ControlNetSet(MultiControlNetModel):
    """Several ControlNets, each with its own control mode and mask (see module docstring)."""

    def __init__(self, controlnets: Sequence[Any], modes: Sequence[str] = (), masks: Sequence[Any] = (),
                 do_cfg: bool = True):
        super().__init__(list(controlnets))
        n = len(self.nets)
        modes = list(modes) or ["Balanced"] * n
        self.soft = [m != CONTROL_MODES[0] for m in modes]
        # pooled (shuffle) ControlNets also act on the conditional half only, as in the extension
        self.cond_only = [m == CONTROL_MODES[2] or bool(net.config.global_pool_conditions)
                          for m, net in zip(modes, self.nets)]
        self.masks = list(masks) or [None] * n
        self.do_cfg = do_cfg
        self.ran: list[int] = [0] * n   # forward calls per unit (tests and benchmarks)
        # unit masks at each residual's (device, dtype, size): built once per pass, not per residual per step
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self.mask_builds = 0

    def _mask_for(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Unit ``i``'s mask resized to ``like``'s spatial size, on its device and in its dtype (cached)."""
        key = (i, like.device, like.dtype, tuple(like.shape[-2:]))
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = F.interpolate(self.masks[i].to(like.device, like.dtype), size=like.shape[-2:], mode="bilinear",
                                 align_corners=False)
            self._mask_cache[key] = mask
            self.mask_builds += 1
        return mask

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, guess_mode=False, return_dict=True):
        # guess_mode True means the pipeline already passes only the conditional half (all units pooled)
        split = self.do_cfg and not guess_mode
        down_total = mid_total = None
        for i, (image, scale, net) in enumerate(zip(controlnet_cond, conditioning_scale, self.nets)):
            if float(scale) == 0.0 and not guess_mode:
                continue
            x, ehs, cond, added = sample, encoder_hidden_states, image, added_cond_kwargs
            half = split and self.cond_only[i]
            if half:
                x, ehs, cond = x.chunk(2)[1], ehs.chunk(2)[1], cond.chunk(2)[1]
                if added:
                    added = {k: v.chunk(2)[1] for k, v in added.items()}
            down, mid = net(x, timestep, encoder_hidden_states=ehs, controlnet_cond=cond,
                            conditioning_scale=1.0, class_labels=class_labels, timestep_cond=timestep_cond,
                            attention_mask=attention_mask, added_cond_kwargs=added,
                            cross_attention_kwargs=cross_attention_kwargs, guess_mode=False, return_dict=False)
            self.ran[i] += 1
            outs = list(down) + [mid]
            factors = soft_scales(len(outs)) if self.soft[i] else [1.0] * len(outs)
            new = []
            for r, k in zip(outs, factors):
                r = r * (float(scale) * k)
                if self.masks[i] is not None:
                    r = r * self._mask_for(i, r)
                if half:  # nothing for the unconditional half
                    r = torch.cat([torch.zeros_like(r), r])
                new.append(r)
            if down_total is None:
                down_total, mid_total = new[:-1], new[-1]
            else:
                down_total = [a + b for a, b in zip(down_total, new[:-1])]
                mid_total = mid_total + new[-1]
        return down_total, mid_total


def make_controlnet_set(controlnets: Sequence[Any], modes: Sequence[str] = (), masks: Sequence[Any] = (),
                        do_cfg: bool = True):
    """A ``MultiControlNetModel`` over ``controlnets`` (the cached modules themselves, not copies)."""
    return ControlNetSet(controlnets, modes, masks, do_cfg)


@dataclass
class ControlPlan:
    """Everything a diffusers ControlNet pipeline call needs for the units."""

    controlnet: Any                       # the ControlNetSet
    images: list[Image.Image]             # control images at W x H, one per unit
    scales: list[float]                   # unit weights
    starts: list[float]
    ends: list[float]
    units: list[ControlUnit] = field(default_factory=list)

    def call_kwargs(self, mode: str) -> dict:
        """Keyword arguments for ``pipe(...)``; txt2img takes the control images as ``image``, the img2img and
        inpaint pipelines as ``control_image`` (their ``image`` is the init image)."""
        key = "image" if mode == "txt2img" else "control_image"
        return {key: list(self.images), "controlnet_conditioning_scale": list(self.scales),
                "control_guidance_start": list(self.starts), "control_guidance_end": list(self.ends),
                "guess_mode": False}


def build_plan(units: Sequence[ControlUnit], controlnets: Sequence[Any], control_images: Sequence[Image.Image], *,
               width: int, height: int, guidance_scale: float) -> ControlPlan:
    """Align enabled units with their loaded ControlNets and prepared control images (same order).

    Units whose ControlNet pools globally (shuffle) are put last: diffusers reads ``nets[0]`` to decide whether
    the whole call runs in guess mode, and only a pooled first net would make it do so."""
    if not (len(units) == len(controlnets) == len(control_images)) or not units:
        raise StudioError("ControlNet: units, models and control images must be given one per enabled unit.",
                          field="controlnet.units")
    order = sorted(range(len(units)), key=lambda i: bool(controlnets[i].config.global_pool_conditions))
    us = [units[i] for i in order]
    cset = make_controlnet_set([controlnets[i] for i in order], [u.control_mode for u in us],
                               [mask_tensor(u.mask, width, height) for u in us], do_cfg=guidance_scale > 1.0)
    return ControlPlan(cset, [control_images[i] for i in order], [float(u.weight) for u in us],
                       [float(u.guidance_start) for u in us], [float(u.guidance_end) for u in us], us)


def controlnet_pipeline(mode: str, family: str, components_kwargs: dict, controlnet: Any) -> Any:
    """A diffusers ControlNet pipeline for ``mode`` over the SAME modules (``components_kwargs``: vae,
    text_encoder(s), tokenizer(s), unet, scheduler, ... e.g. ``manager.pipeline(...).components``)."""
    from .. import families
    spec = families.get(family)
    if spec is None or not spec.controlnet:
        raise StudioError(f"ControlNet does not work with {families.label(family)} checkpoints.",
                          field="controlnet.units", fix="use a base checkpoint of a family that takes ControlNets")
    if mode not in spec.controlnet_pipelines:
        raise StudioError(f"Unknown mode {mode!r} for ControlNet.", field="mode", fix="txt2img, img2img or inpaint")
    pipe = spec.make_pipeline(mode, components_kwargs, controlnet=controlnet)
    return pipe
