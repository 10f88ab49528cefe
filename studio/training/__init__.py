"""Training: LoRA / LyCORIS / DreamBooth-LoRA / Textual Inversion from a dataset folder and one TOML config.

Entry points: ``TrainingService(studio)`` (the Train tab), ``launch_training(path)`` (a child process via
``accelerate launch``), ``train(cfg)`` (in-process), ``cli_main(argv)`` (``python -m studio.training``).
Heavy imports (torch, diffusers, peft) happen only when training starts.
"""
from .config import TrainConfig


_LAZY = {"TrainingService": "service", "launch_training": "runner", "TrainingProcess": "runner",
         "TrainingQueue": "runner", "cli_main": "runner", "run_config": "runner", "train": "trainer",
         "Trainer": "trainer", "TrainResult": "trainer"}


def __getattr__(name):
    # lazy: the tab imports this package for TrainConfig without pulling in torch
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["TrainConfig", "TrainingService", "launch_training", "TrainingProcess", "TrainingQueue", "cli_main",
           "run_config", "train", "Trainer", "TrainResult"]
