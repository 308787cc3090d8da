"""``make demo``: the whole job on the embedded default, on a laptop CPU, in minutes.

1. Checks every op backend against the float64 reference on a video latent (a table).
2. Scores the shipped shapes text-to-image base model on held-out prompts.
3. GRPO-trains it on the alignment reward (the shipped config shapes_t2i).
4. Scores it again and prints before / after, with sample grids and the reward curve.

    python -m dancegrpo.demo [--steps N] [--out outputs/demo] [--config shapes_t2i]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULT_CONFIG = "shapes_t2i"  # a shipped config: the demo needs no source tree


def _evaluate(model, cfg, device):
    """The run's evaluation (the same as ``dancegrpo eval`` and the base models' eval.json) and
    the samples of its first 32 prompts for a grid (the evaluation's own, not generated again)."""
    from .trainer.evaluate import evaluate_config_samples, first_samples

    stats, samples, _ = evaluate_config_samples(model, cfg, device=device)
    return stats, first_samples(model, cfg, samples, 32, device=device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a shipped config's name or a YAML file")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the config's max_steps)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts to score (default: config)")
    p.add_argument("--skip-ops", action="store_true", help="skip the op-backend check table")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args(argv)

    from . import opscheck
    from .trainer import Trainer, load_config
    from .trainer.images import save_grid
    from .trainer.policy import build_policy, resolve_device

    t_start = time.time()
    out = Path(args.out)
    run_dir = out / "run"
    overrides = [f"output_dir={run_dir}", "overwrite=true"]  # the demo's own previous run: start afresh
    if args.steps is not None:
        overrides.append(f"max_steps={args.steps}")
    if args.eval_prompts is not None:
        overrides.append(f"eval.num_prompts={args.eval_prompts}")
    cfg = load_config(args.config, overrides + list(args.overrides))  # a config mistake shows up first
    device = resolve_device(cfg.device)

    if not args.skip_ops:
        print("== 1. fused ops vs the float64 reference ==", flush=True)
        print(opscheck.format_table(opscheck.run(opscheck.VIDEO_LATENT), opscheck.VIDEO_LATENT), flush=True)
    torch.manual_seed(cfg.seed)

    print(f"\n== 2. base model on {cfg.eval.num_prompts} held-out prompts ==", flush=True)
    base = build_policy(cfg, device)
    before, before_samples = _evaluate(base, cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(before_samples, out / "before", columns=8)
    print(json.dumps({k: before[k] for k in ("reward_mean", "correct_rate") if k in before}), flush=True)

    print(f"\n== 3. GRPO: {cfg.max_steps} steps of {cfg.rollout.prompts_per_step} prompts x "
          f"{cfg.rollout.group_size} samples ==", flush=True)
    t0 = time.time()
    trainer = Trainer(cfg, model=base)
    trainer.train()
    train_s = time.time() - t0

    print(f"\n== 4. trained model on the same {cfg.eval.num_prompts} held-out prompts ==", flush=True)
    after, after_samples = _evaluate(trainer.model, cfg, device)
    save_grid(after_samples, out / "after", columns=8)

    summary = {"before": before, "after": after, "train_seconds": round(train_s, 1),
               "total_seconds": round(time.time() - t_start, 1), "steps": cfg.max_steps, "run_dir": str(run_dir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{'held-out':<22}{'before':>10}{'after':>10}")
    rows = [("reward_mean", "reward (weighted sum)", "{:>10.3f}")]
    rows += [(k, k[len("reward_"):-len("_mean")], "{:>10.3f}") for k in before
             if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean"]
    rows.append(("correct_rate", "% correct", "{:>9.1f}%"))
    for key, label, fmt in rows:
        if key in before and key in after:
            scale = 100 if key == "correct_rate" else 1
            print(f"{label:<22}" + fmt.format(before[key] * scale) + fmt.format(after[key] * scale))
    print(f"\ntraining {train_s / 60:.1f} min; total {summary['total_seconds'] / 60:.1f} min")
    print(f"grids: {out / 'before.png'} {out / 'after.png'}; reward curve and metrics in {run_dir}")
    return 0


if __name__ == "__main__":
    from .cli import run_reporting

    raise SystemExit(run_reporting("dancegrpo.demo", main))
