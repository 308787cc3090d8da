"""The "shapes" world: a prompt grammar, a procedural renderer, a tiny text encoder and
weight-free rewards, so the library runs end to end on a laptop CPU with no downloads.

* ``grammar``  - vocabularies, :class:`SceneSpec`, prompts, the train/held-out split
* ``renderer`` - anti-aliased images (3, H, W) and videos (3, T, H, W) in [0, 1]
* ``text``     - :class:`Tokenizer` and :class:`TextEncoder`
* ``detector`` - the deterministic object detector the rewards use
* ``rewards``  - alignment, binary, aesthetic, motion and JPEG-compressibility rewards
* ``dataset``  - :class:`PromptDataset` for rollouts, evaluation and pretraining data
"""

from .dataset import PromptDataset, PromptItem
from .detector import Detection, detect, detect_batch
from .grammar import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    SceneSpec,
    all_specs,
    parse_prompt,
    sample_specs,
    split_of,
)
from .renderer import first_frame, first_frames, render_batch, render_image, render_video
from .rewards import (
    AestheticReward,
    AlignmentReward,
    BinaryReward,
    JpegCompressibilityReward,
    MotionReward,
)
from .text import TextEncoder, Tokenizer

__all__ = [
    "COLORS", "SHAPES", "SIZES", "POSITIONS", "BACKGROUNDS", "MOTIONS", "SceneSpec", "parse_prompt",
    "all_specs", "split_of", "sample_specs",
    "render_image", "render_video", "render_batch", "first_frame", "first_frames",
    "Tokenizer", "TextEncoder",
    "Detection", "detect", "detect_batch",
    "AlignmentReward", "BinaryReward", "AestheticReward", "MotionReward", "JpegCompressibilityReward",
    "PromptItem", "PromptDataset",
]
