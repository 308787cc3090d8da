"""Rewards: the registry of reward models by name (implementations live in their worlds)."""

from .registry import DATASETS, REWARDS, build_dataset, build_reward, reward_names

__all__ = ["REWARDS", "DATASETS", "build_reward", "build_dataset", "reward_names"]
