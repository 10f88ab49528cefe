"""Training: LoRA / LyCORIS / DreamBooth-LoRA / Textual Inversion from a dataset folder and one TOML config.

Entry points: ``TrainingService(studio)`` (the Train tab), ``launch_training(path)`` (a child process via
``accelerate launch``), ``train(cfg)`` (in-process), ``cli_main(argv)`` (``python -m studio.training``).
Heavy imports (torch, diffusers, peft) happen only when training starts.
"""
from .config import TrainConfig


def __getattr__(name):
    # lazy: the tab imports this package for TrainConfig without pulling in torch
    from . import runner, service, trainer
    table = {"TrainingService": service.TrainingService, "launch_training": runner.launch_training,
             "TrainingProcess": runner.TrainingProcess, "TrainingQueue": runner.TrainingQueue,
             "cli_main": runner.cli_main, "run_config": runner.run_config, "train": trainer.train,
             "Trainer": trainer.Trainer, "TrainResult": trainer.TrainResult}
    if name in table:
        return table[name]
    raise AttributeError(name)


__all__ = ["TrainConfig", "TrainingService", "launch_training", "TrainingProcess", "TrainingQueue", "cli_main",
           "run_config", "train", "Trainer", "TrainResult"]
