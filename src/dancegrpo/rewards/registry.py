"""Reward registry: name -> reward class, lazily imported ``"module:attr"`` strings.

A reward is a callable ``reward(samples, prompts) -> (B,) float32`` with a ``name``; samples
are (B, 3, H, W) or (B, 3, T, H, W) in [0, 1]. It may also offer ``correct(samples, prompts)
-> (B,) bool`` (then ``dancegrpo eval`` reports ``correct_rate``). The learned rewards of the
paper (HPS, CLIP, VideoAlign) are listed so paper configs validate; building one says why it
is not available yet.
"""

from __future__ import annotations

from ..models.registry import LazyRegistry

__all__ = ["REWARDS", "DATASETS", "build_reward", "build_dataset", "reward_names"]

_SHAPES = "dancegrpo.worlds.shapes.rewards"
_LEARNED = ("needs a learned reward model and its weights (the [rewards] extra and a local checkpoint); "
            "its adapter is not written yet")

REWARDS = LazyRegistry(
    "reward",
    {
        "toy": "dancegrpo.worlds.toy:ToyColourReward",
        "shapes_alignment": f"{_SHAPES}:AlignmentReward",
        "shapes_binary": f"{_SHAPES}:BinaryReward",
        "shapes_aesthetic": f"{_SHAPES}:AestheticReward",
        "shapes_motion": f"{_SHAPES}:MotionReward",
        "jpeg_compressibility": f"{_SHAPES}:JpegCompressibilityReward",
    },
    unavailable={
        "hps_v2": f"HPS-v2.1 {_LEARNED}",
        "clip_score": f"CLIP score {_LEARNED}",
        "videoalign_vq": f"VideoAlign visual quality {_LEARNED}",
        "videoalign_mq": f"VideoAlign motion quality {_LEARNED}",
    },
)

# Prompt datasets: ``Dataset(task=..., split=..., **kwargs)`` with ``sample(n, generator)`` and
# ``fixed(n)`` returning items with ``.text`` and ``.image`` (None, or (3, H, W) in [0, 1]).
DATASETS = LazyRegistry(
    "prompt dataset",
    {
        "toy": "dancegrpo.worlds.toy:ToyPromptDataset",
        "shapes": "dancegrpo.worlds.shapes.dataset:PromptDataset",
        "prompt_file": "dancegrpo.trainer.prompts:PromptFile",
    },
)


def build_reward(name: str, **kwargs):
    """The reward registered as ``name``, constructed with ``kwargs``."""
    return REWARDS.build(name, **kwargs)


def build_dataset(name: str, **kwargs):
    """The prompt dataset registered as ``name``, constructed with ``kwargs`` (task, split...)."""
    return DATASETS.build(name, **kwargs)


def reward_names() -> tuple[str, ...]:
    return REWARDS.names()
