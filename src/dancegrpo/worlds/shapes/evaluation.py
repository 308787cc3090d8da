"""Held-out evaluation of shapes-world models: a run config's ``dancegrpo eval`` plus the
per-attribute and video diagnostics the base models' ``eval.json`` and the demos report.

* ``correct_rate_<attribute>``: colour, shape, size, position each judged alone, and
  ``correct_rate_color_shape`` both colour and shape right (whatever the config's rewards);
* videos: ``correct_rate_motion``, the share of clips whose tracked object makes the asked
  motion (``MotionReward.classify``);
* image-to-video: ``first_frame_error``, the mean absolute pixel difference between the
  generated first frame and the given one, and ``frame_trust_rate``: given the frame with a
  caption naming another colour *and* another shape, the share of clips that keep the frame's
  colour and shape (a model that follows the caption instead scores 0).
"""

from __future__ import annotations

import dataclasses

import torch

from ...trainer.evaluate import evaluate_config_samples, generate_as_eval
from ...trainer.scoring import WeightedReward
from .dataset import PromptItem
from .grammar import COLORS, SHAPES, parse_prompt
from .rewards import ATTRIBUTES, AlignmentReward, MotionReward


def contradicting(prompt: str) -> str:
    """``prompt`` with its colour and its shape both replaced (by the next ones in the vocabularies)."""
    spec = parse_prompt(prompt)
    colors, shapes = list(COLORS), list(SHAPES)
    return dataclasses.replace(spec, color=colors[(colors.index(spec.color) + 1) % len(colors)],
                               shape=shapes[(shapes.index(spec.shape) + 1) % len(shapes)]).prompt


def evaluate_shapes(policy, cfg, *, device="cpu") -> tuple[dict, torch.Tensor]:
    """``evaluate_config`` of ``policy`` under ``cfg`` with the diagnostics above; returns the
    statistics and the evaluation's samples (generated once, scored and inspected)."""
    extra = [WeightedReward(AlignmentReward((a,)), 0.0, a) for a in ATTRIBUTES]
    extra.append(WeightedReward(AlignmentReward(("color", "shape")), 0.0, "color_shape"))
    if policy.video:
        extra.append(WeightedReward(MotionReward(), 0.0, "motion"))
    stats, samples, items = evaluate_config_samples(policy, cfg, device=device, extra_rewards=extra)
    if policy.task != "i2v":
        return stats, samples
    per = cfg.eval.samples_per_prompt
    given = torch.stack([it.image for it in items]).repeat_interleave(per, dim=0)
    stats["first_frame_error"] = float((samples[:, :, 0].float().cpu() - given).abs().mean())
    lying = [PromptItem(contradicting(it.text), it.image) for it in items]
    kept_samples, _ = generate_as_eval(policy, cfg, lying, device=device)
    kept = AlignmentReward(("color", "shape")).correct(kept_samples, [it.text for it in items])
    stats["frame_trust_rate"] = float(kept.float().mean())
    return stats, samples
