"""The GRPO trainer: config, rollouts, rewards, update, checkpoints, logs.

    from dancegrpo.trainer import load_config, train
    train(load_config("configs/toy.yaml", ["max_steps=20"]))

Not imported by ``import dancegrpo``.
"""

from .config import ConfigError, TrainConfig, load_config, save_config
from .loop import Trainer, train

__all__ = ["TrainConfig", "ConfigError", "load_config", "save_config", "Trainer", "train"]
