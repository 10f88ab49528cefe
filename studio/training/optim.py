"""Optimizer and learning-rate scheduler from the config (per-part learning rates as param groups)."""
from __future__ import annotations

from ..errors import StudioError
from .config import TrainConfig


def _optimizer_spec(cfg: TrainConfig):
    """(optimizer class, keyword arguments besides the learning rates)."""
    wd = 0.0 if cfg.is_ti else cfg.weight_decay  # TI: the restore after each step would fight weight decay anyway
    name = cfg.optimizer
    if name == "AdamW":
        import torch
        return torch.optim.AdamW, {"weight_decay": wd}
    if name == "Adafactor":
        from transformers.optimization import Adafactor
        return Adafactor, {"scale_parameter": False, "relative_step": False, "warmup_init": False,
                           "weight_decay": wd}
    if name == "Prodigy":
        import prodigyopt
        return prodigyopt.Prodigy, {"weight_decay": wd}
    if name in ("AdamW8bit", "Lion8bit"):
        import bitsandbytes as bnb
        return (bnb.optim.AdamW8bit if name == "AdamW8bit" else bnb.optim.Lion8bit), {"weight_decay": wd}
    raise StudioError(f"Unknown optimizer {name!r}.", field="optimizer.optimizer", fix="use AdamW")


def make_optimizer(cfg: TrainConfig, params: dict[str, list]):
    """``params``: part ("unet", "text_encoder", "text_encoder_2") -> parameters."""
    groups = [{"params": ps, "lr": cfg.lr_for("unet" if part == "unet" else "text_encoder")}
              for part, ps in params.items() if ps]
    if not groups:
        raise StudioError("Nothing to train.", field="network.train_unet", fix="enable the UNet or text encoder")
    cls, kwargs = _optimizer_spec(cfg)
    return cls(groups, **kwargs)


def kohya_optimizer_name(cfg: TrainConfig) -> str:
    """``ss_optimizer`` as kohya writes it: the class's module path, then ``(k=v,...)`` when arguments were
    given (``torch.optim.adamw.AdamW(weight_decay=0.01)``)."""
    cls, kwargs = _optimizer_spec(cfg)
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    """Counted in optimizer steps (the trainer steps it once per step, whatever the number of processes)."""
    from diffusers.optimization import get_scheduler
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=total_steps, num_cycles=cfg.lr_num_cycles)
